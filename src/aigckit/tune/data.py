"""Training data for the tuners: JSONL rows checked one by one (a bad row is one error naming ``file:line``), chats
through the model's chat template with a mask on the assistant's tokens, packing, padding, and the data order.

Row shapes (as TRL's data sets):
  SFT   {"messages": [{"role": ..., "content": ...}, ...]}   loss on the assistant turns only
        {"text": "..."}                                       loss on every token (EOS appended)
  DPO   {"prompt": str | messages, "chosen": str | [assistant message], "rejected": ...}
  RL    {"prompt": str | messages, ...any other columns, handed to the reward functions}
A string prompt is used as raw text; a list of messages goes through the chat template with the generation prompt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from aigckit.errors import AigcError

IGNORE = -100  # label of a token that carries no loss


@dataclass
class Row:
    where: str  # "file:line"
    data: dict


def read_jsonl(path: str | Path, kind: str) -> list[Row]:
    """Rows of a JSONL (or Parquet) file, a path or an fsspec URL, each checked for ``kind`` ("sft" | "dpo" | "rl");
    the first bad row raises an ``AigcError`` naming its file and line."""
    from aigckit.data.shards import iter_records

    url = str(path) if "://" in str(path) else str(Path(path).expanduser())
    rows = []
    try:
        for where, obj in iter_records(url, param="data"):
            problem = CHECKS[kind](obj)
            if problem:
                raise AigcError(f"{where}: {problem}", param="data")
            rows.append(Row(where, obj))
    except FileNotFoundError:
        raise AigcError(f"data file {url} does not exist", param="data") from None
    except (OSError, UnicodeDecodeError) as e:
        raise AigcError(f"cannot read data file {url}: {e}", param="data") from None
    if not rows:
        raise AigcError(f"data file {url} has no rows", param="data")
    return rows


def _messages_problem(msgs, what: str = "messages") -> str | None:
    if not isinstance(msgs, list) or not msgs:
        return f"{what} must be a non-empty list of {{role, content}} objects"
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"{what}[{i}] must be an object with string role and content"
    return None


def _sft_problem(obj: dict) -> str | None:
    if "messages" in obj:
        p = _messages_problem(obj["messages"])
        if p is None and not any(m["role"] == "assistant" for m in obj["messages"]):
            return "messages has no assistant turn (the loss is on assistant tokens)"
        return p
    if "text" in obj:
        return None if isinstance(obj["text"], str) and obj["text"] else "text must be a non-empty string"
    return 'a row needs "messages" (a chat) or "text"'


def _prompt_problem(obj: dict) -> str | None:
    if "prompt" not in obj:
        return 'a row needs "prompt"'
    pr = obj["prompt"]
    if isinstance(pr, str):
        return None if pr else "prompt is empty"
    return _messages_problem(pr, "prompt")


def _completion_problem(obj: dict, key: str) -> str | None:
    v = obj.get(key)
    if isinstance(v, str):
        return None if v else f"{key} is empty"
    if isinstance(v, list) and len(v) == 1 and _messages_problem(v, key) is None and v[0]["role"] == "assistant":
        return None
    return f"{key} must be a string or a list with one assistant message"


def _dpo_problem(obj: dict) -> str | None:
    p = _prompt_problem(obj) or _completion_problem(obj, "chosen") or _completion_problem(obj, "rejected")
    if p is None and isinstance(obj["prompt"], str) != isinstance(obj["chosen"], str):
        return "prompt and chosen/rejected must both be strings or both be chat messages"
    return p


CHECKS = {"sft": _sft_problem, "dpo": _dpo_problem, "rl": _prompt_problem}


def split_indices(n: int, eval_frac: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of a training / held-out split of ``n`` rows drawn by ``seed`` (at least one held-out row when
    ``eval_frac > 0`` and there are >= 2 rows), each in the original order."""
    if eval_frac <= 0 or n < 2:
        return list(range(n)), []
    n_eval = min(n - 1, max(1, round(n * eval_frac)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    held = set(perm[:n_eval])
    return [i for i in range(n) if i not in held], [i for i in range(n) if i in held]


def split_rows(rows: list[Row], eval_frac: float, seed: int) -> tuple[list[Row], list[Row]]:
    """A held-out split drawn by ``seed`` (``split_indices``)."""
    train, held = split_indices(len(rows), eval_frac, seed)
    return [rows[i] for i in train], [rows[i] for i in held]


def train_and_held(args, kind: str) -> tuple[list[Row], list[Row]]:
    """The training rows and the held-out rows of a run: ``args.eval_data``, or ``args.eval_frac`` of ``args.data``."""
    rows = read_jsonl(args.data, kind)
    if args.eval_data:
        return rows, read_jsonl(args.eval_data, kind)
    return split_rows(rows, args.eval_frac, args.seed)


def pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else 0


def rank_rows(n: int, step: int, per_rank: int, seed: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """This rank's rows of optimiser step ``step``: the step's global batch (``per_rank x world_size`` rows, from
    ``sample_indices``) cut into one slice per rank, as ``train.distributed.ShardedSampler`` does; rank r takes the
    r-th. The data position is ``step x global batch`` samples, so a run keeps its place when it resumes on another
    number of ranks with the same global batch (and one process with the global batch sees the same rows)."""
    rows = sample_indices(n, step, per_rank * world_size, seed)
    return rows[rank * per_rank:(rank + 1) * per_rank]


def sample_indices(n: int, step: int, per_step: int, seed: int) -> list[int]:
    """Row indices of optimiser step ``step``: consecutive slices of one permutation per epoch (seeded by
    ``(seed, epoch)``), so the data order depends only on the step and a resumed run sees the same batches."""
    out = []
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, pos = divmod(k, n)
        out.append(_perm(n, seed, epoch)[pos])
    return out


_PERMS: dict[tuple[int, int, int], list[int]] = {}


def _perm(n: int, seed: int, epoch: int) -> list[int]:
    key = (n, seed, epoch)
    if key not in _PERMS:
        if len(_PERMS) > 8:
            _PERMS.clear()
        _PERMS[key] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    return _PERMS[key]


# ------------------------------------------------------------------------------------------------ tokenising


@dataclass
class Example:
    ids: list[int]
    labels: list[int]  # IGNORE where there is no loss
    where: str = ""


def _check_prefix(full: list[int], prefix: list[int], where: str) -> None:
    if full[:len(prefix)] != prefix:
        raise AigcError(f"{where}: the chat template does not render this conversation incrementally (a prefix of the "
                        "messages is not a prefix of the tokens), so assistant tokens cannot be masked", param="data")


def chat_example(tok, messages: list[dict], where: str) -> Example:
    """Ids of the whole chat; labels on the tokens each assistant turn adds (its text and end-of-turn marker)."""
    if tok.chat_template is None:
        raise AigcError(f"{where}: chat rows need a model with a chat template", param="data")
    ids = tok.encode_chat(messages, add_generation_prompt=False)
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tok.encode_chat(messages[:i], add_generation_prompt=True) if i else []
        through = tok.encode_chat(messages[:i + 1], add_generation_prompt=False)
        _check_prefix(through, before, where)
        _check_prefix(ids, through, where)
        labels[len(before):len(through)] = ids[len(before):len(through)]
    return Example(ids, labels, where)


def text_example(tok, text: str, where: str) -> Example:
    ids = tok.encode(text)
    if tok.eos_token_id is not None and (not ids or ids[-1] != tok.eos_token_id):
        ids = ids + [tok.eos_token_id]
    return Example(ids, list(ids), where)


def sft_example(tok, row: Row) -> Example:
    d = row.data
    return chat_example(tok, d["messages"], row.where) if "messages" in d else text_example(tok, d["text"], row.where)


def prompt_ids(tok, prompt: str | list[dict]) -> list[int]:
    if isinstance(prompt, str):
        return tok.encode(prompt)
    if tok.chat_template is None:
        raise AigcError("chat prompts need a model with a chat template", param="data")
    return tok.encode_chat(prompt, add_generation_prompt=True)


def completion_ids(tok, prompt: str | list[dict], completion: str | list[dict], where: str) -> tuple[list, list]:
    """(prompt ids, completion ids): a chat is rendered whole and split where the prompt ends; raw text gets EOS."""
    p = prompt_ids(tok, prompt)
    if isinstance(prompt, str):
        c = tok.encode(completion, add_special_tokens=False)
        if tok.eos_token_id is not None:
            c = c + [tok.eos_token_id]
        return p, c
    full = tok.encode_chat(prompt + completion, add_generation_prompt=False)
    _check_prefix(full, p, where)
    return p, full[len(p):]


@dataclass
class Batch:
    ids: Tensor  # [B, T]
    labels: Tensor  # [B, T] (IGNORE on padding and prompt tokens)
    tokens: int = field(default=0)  # real (non-padding) tokens


def pad_batch(examples: list[Example], pad_id: int) -> Batch:
    """Right-padded batch (causal attention never looks right, so padding needs no mask)."""
    T = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, :len(e.ids)] = torch.tensor(e.ids)
        labels[i, :len(e.labels)] = torch.tensor(e.labels)
    return Batch(ids, labels, sum(len(e.ids) for e in examples))


def pack(examples: list[Example], block: int) -> list[Example]:
    """Concatenate examples (each already ends with its EOS or end-of-turn) and cut into blocks of ``block`` tokens;
    the last, shorter block is kept. Attention crosses example boundaries inside a block (as in classic packing)."""
    ids: list[int] = []
    labels: list[int] = []
    for e in examples:
        ids += e.ids
        labels += e.labels
    return [Example(ids[i:i + block], labels[i:i + block], "packed") for i in range(0, len(ids), block)]


def truncate(e: Example, max_len: int) -> Example:
    return e if len(e.ids) <= max_len else Example(e.ids[:max_len], e.labels[:max_len], e.where)


# ------------------------------------------------------------------------------------------------ token shards


def sft_shard_rows(tok, url: str):
    """``(ids, loss mask)`` of every SFT row of a .jsonl/.parquet (path or fsspec URL), tokenised exactly as
    ``aigc finetune`` tokenises JSONL rows: what ``aigc data tokenize --sft`` writes into shards."""
    from aigckit.data.shards import iter_records

    for where, obj in iter_records(url):
        problem = _sft_problem(obj)
        if problem:
            raise AigcError(f"{where}: {problem}", param="input")
        e = sft_example(tok, Row(where, obj))
        yield e.ids, [lab != IGNORE for lab in e.labels]


def is_shard_folder(data: str) -> bool:
    """Whether ``--data`` names a token-shard folder (``aigc data tokenize``) rather than a JSONL file."""
    from aigckit.data.urls import file_name

    if "://" in data and not data.startswith("file://"):
        return not file_name(data).endswith((".jsonl", ".ndjson", ".parquet", ".json"))
    p = Path(data[len("file://"):] if data.startswith("file://") else data).expanduser()
    return p.is_dir()  # a folder without INDEX is refused by TokenShards, with a message


def open_sft_shards(data: str, tok):
    """The memory-mapped shards of ``--data``, checked against the model's tokenizer."""
    from aigckit.data.shards import TokenShards

    ts = TokenShards(data)
    kind = ts.index.get("kind")
    if kind not in ("sft", "text", None):  # text (or written by write_shards without a kind): loss on every token
        raise AigcError(f"{data}: shards of kind {kind!r}; tokenise SFT rows with aigc data tokenize --sft",
                        param="data")
    if ts.index["vocab_size"] != tok.vocab_size:
        raise AigcError(f"{data} was tokenised with a vocabulary of {ts.index['vocab_size']} "
                        f"({ts.index.get('tokenizer')}); the model's has {tok.vocab_size}: tokenise with its "
                        f"tokenizer (aigc data tokenize --model)", param="data")
    return ts


class _ShardExamples:
    """A list-like of SFT examples made from shard tokens on demand (an index or a slice)."""

    items: list[int]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self.example(i) for i in self.items[k]]
        return self.example(self.items[k])

    def example(self, i: int) -> Example:
        raise NotImplementedError


class ShardRows(_ShardExamples):
    """SFT examples read from shards on demand, one document (row) each, cut to ``max_len``: only the tokens of the
    rows asked for are read from the memory map. ``docs`` are the document numbers this split uses."""

    def __init__(self, shards, docs: list[int], max_len: int) -> None:
        self.shards, self.items, self.max_len = shards, docs, max_len

    def example(self, i: int) -> Example:
        start, stop = self.shards.doc_span(i)
        return _shard_example(self.shards, start, min(stop, start + self.max_len), f"doc {i}")


class ShardBlocks(_ShardExamples):
    """Packed SFT examples from shards: block k is tokens ``[k x block, (k + 1) x block)`` of the whole corpus (the
    last one shorter), what ``pack`` makes of the same rows. ``blocks`` are the block numbers this split uses."""

    def __init__(self, shards, blocks: list[int], block: int) -> None:
        self.shards, self.items, self.block = shards, blocks, block

    @staticmethod
    def count(shards, block: int) -> int:
        return -(-len(shards) // block)

    def example(self, i: int) -> Example:
        start = i * self.block
        return _shard_example(self.shards, start, min(len(self.shards), start + self.block), "packed")


def _shard_example(shards, start: int, stop: int, where: str) -> Example:
    ids = shards.tokens(start, stop)
    labels = np.where(shards.mask(start, stop), ids, IGNORE)
    return Example(ids.tolist(), labels.tolist(), where)
