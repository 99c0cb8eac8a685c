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

import torch
from torch import Tensor

from aigckit.errors import AigcError

IGNORE = -100  # label of a token that carries no loss


@dataclass
class Row:
    where: str  # "file:line"
    data: dict


def read_jsonl(path: str | Path, kind: str) -> list[Row]:
    """Rows of a JSONL file, each checked for ``kind`` ("sft" | "dpo" | "rl"); the first bad row raises an
    ``AigcError`` naming its file and line."""
    path = Path(path).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise AigcError(f"data file {path} does not exist", param="data") from None
    except (OSError, UnicodeDecodeError) as e:
        raise AigcError(f"cannot read data file {path}: {e}", param="data") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise AigcError(f"{where}: not valid JSON ({e.msg})", param="data") from None
        if not isinstance(obj, dict):
            raise AigcError(f"{where}: a row must be a JSON object, got {type(obj).__name__}", param="data")
        problem = CHECKS[kind](obj)
        if problem:
            raise AigcError(f"{where}: {problem}", param="data")
        rows.append(Row(where, obj))
    if not rows:
        raise AigcError(f"data file {path} has no rows", param="data")
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


def split_rows(rows: list[Row], eval_frac: float, seed: int) -> tuple[list[Row], list[Row]]:
    """A held-out split drawn by ``seed`` (at least one row when ``eval_frac > 0`` and there are >= 2 rows)."""
    if eval_frac <= 0 or len(rows) < 2:
        return rows, []
    n_eval = min(len(rows) - 1, max(1, round(len(rows) * eval_frac)))
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    held = set(perm[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def train_and_held(args, kind: str) -> tuple[list[Row], list[Row]]:
    """The training rows and the held-out rows of a run: ``args.eval_data``, or ``args.eval_frac`` of ``args.data``."""
    rows = read_jsonl(args.data, kind)
    if args.eval_data:
        return rows, read_jsonl(args.eval_data, kind)
    return split_rows(rows, args.eval_frac, args.seed)


def pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else 0


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
