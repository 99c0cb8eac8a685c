"""`aigc text | chat | score | tokenize`: text generation from the command line (parsing only)."""

from __future__ import annotations

import argparse
import json
import sys

from aigckit.cli.audio import add_speak_args, reply_speaker
from aigckit.cli.trust import add_watermark_args, watermark_of
from aigckit.dtypes import DTYPES
from aigckit.errors import AigcError
from aigckit.cli.constrain import add_constraint_args, logprobs_json, params_from_args, tool_chat
from aigckit.text.params import MAX_NEW_TOKENS_DEFAULT, TEMPERATURE_FLOOR, GenerationParams


def quant_mode(value: str) -> str:
    """argparse type for --quantize: one of ``aigckit.text.quant.QUANT_MODES`` (imported only when given)."""
    from aigckit.text.quant import QUANT_MODES

    if value not in QUANT_MODES:
        raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from {', '.join(QUANT_MODES)})")
    return value


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", "-m", default=None,
                   help="store name, .gguf file, HF directory, cached HF hub id (e.g. gpt2-medium), or openai:NAME "
                        "(default: smollm2-135m-instruct)")
    g.add_argument("--dtype", choices=DTYPES, default="float32", help="compute dtype (default float32)")
    g.add_argument("--quantize", type=quant_mode, default=None, metavar="MODE",
                   help="quantise the linears: int8 (per-row weights), int4 (group-32 weights, 8-bit head), w8a8 "
                        "(int8 weights and per-row int8 activations, integer matmul: fastest for batches)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    g.add_argument("--kernels", choices=["auto", "torch"], default="auto",
                   help="float32 linears -- auto: numba tile kernel for <= 16 rows, oneDNN prepacked for more; "
                        "torch: plain nn.Linear (AIGC_NO_NUMBA=1 also turns off the fused numba decode kernels)")
    g.add_argument("--base-url", default=None, help="API base URL for openai:NAME models")
    g.add_argument("--adapter", default=None, metavar="DIR",
                   help="LoRA adapter folder (peft layout: adapter_config.json + adapter_model.safetensors, e.g. "
                        "RUN/adapter of `aigc finetune`), merged into the weights at load")


def _gen_args(p: argparse.ArgumentParser, chat: bool = False) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"tokens to generate (default {MAX_NEW_TOKENS_DEFAULT})")
    g.add_argument("--max-length", type=int, default=None, help="limit on prompt + generated tokens")
    g.add_argument("--temperature", "-t", type=float, default=0.7,
                   help=f"0 = greedy (default 0.7); below {TEMPERATURE_FLOOR:g} also greedy")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1 = off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    g.add_argument("--no-repeat-ngram-size", type=int, default=0, help="forbid repeating n-grams of this size")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    if not chat:
        g.add_argument("--num-beams", type=int, default=1, help="beam search width (1 = no beam search)")
        g.add_argument("--length-penalty", type=float, default=1.0, help="beam score = logprob / length**penalty")
        g.add_argument("--early-stopping", default="false", choices=["true", "false", "never"],
                       help="beam search stopping rule (as in transformers)")
        g.add_argument("--num-return-sequences", type=int, default=1, help="sequences to return")
    add_constraint_args(p, chat=chat)
    add_watermark_args(p)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("text", help="generate a continuation of a prompt",
                       description="Generate text. The prompt comes from the argument or, if absent, from stdin. "
                                   "Streams to a terminal unless --no-stream or --json.")
    p.add_argument("prompt", nargs="?", help="the prompt (default: read stdin)")
    _model_args(p)
    _gen_args(p)
    p.add_argument("--no-stream", action="store_true", help="print the text only when done")
    p.add_argument("--json", action="store_true", help="print one JSON object with text, token ids, usage, timings")
    p.set_defaults(func=_text)

    p = sub.add_parser("chat", help="chat with an instruction-tuned model",
                       description="Interactive chat with history. With stdin not a terminal, reads one user turn "
                                   "from stdin and prints the answer. Type /exit to leave, /reset to clear history.")
    _model_args(p)
    _gen_args(p, chat=True)
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--json", action="store_true", help="(one-shot mode) print a JSON object")
    add_speak_args(p)
    p.set_defaults(func=_chat)

    p = sub.add_parser("score", help="negative log-likelihood and perplexity of a text",
                       description="Mean NLL (natural log, over predicted tokens) and perplexity of TEXT (or stdin). "
                                   "Long texts are scored in sliding windows (as in transformers' perplexity guide): "
                                   "each forward sees at most --window tokens and the window moves --stride tokens; "
                                   "each token is predicted once, with the tokens before it in its window as "
                                   "context. --stride equal to --window gives non-overlapping windows.")
    p.add_argument("text", nargs="?")
    _model_args(p)
    p.add_argument("--window", type=int, default=None,
                   help="tokens per forward window (default: the context, at most 1024)")
    p.add_argument("--stride", type=int, default=None, help="tokens the window moves by (default: window / 2)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_score)

    p = sub.add_parser("tokenize", help="show token ids and pieces of a text")
    p.add_argument("text", nargs="?")
    p.add_argument("--model", "-m", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_tokenize)


def _read_arg_or_stdin(value: str | None, what: str) -> str:
    if value is not None:
        return value
    if sys.stdin is None or sys.stdin.isatty():
        raise AigcError(f"no {what} given: pass it as an argument or on stdin")
    text = sys.stdin.read()
    if not text.strip():
        raise AigcError(f"empty {what} on stdin")
    return text.rstrip("\n")


def _load(args):
    from aigckit.text.lm import load_lm

    return load_lm(args.model, dtype=args.dtype, quantize=args.quantize, threads=args.threads,
                   kernels=args.kernels, base_url=args.base_url, adapter=args.adapter)


def _params(args) -> GenerationParams:
    """The options as one validated value: bad values fail here, before the model loads."""
    p = dict(max_new_tokens=args.max_new_tokens, max_length=args.max_length, temperature=args.temperature,
             top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
             no_repeat_ngram_size=args.no_repeat_ngram_size, stop=args.stop, seed=args.seed)
    if hasattr(args, "num_beams"):
        p.update(num_beams=args.num_beams, length_penalty=args.length_penalty,
                 early_stopping={"true": True, "false": False, "never": "never"}[args.early_stopping],
                 num_return_sequences=args.num_return_sequences)
    wm = watermark_of(args)
    extra = params_from_args(args)
    if wm is not None:
        extra["processors"] = tuple(extra.get("processors", ())) + (wm,)
    return GenerationParams(**p, **extra)


def _text(args) -> int:
    prompt = _read_arg_or_stdin(args.prompt, "prompt")
    params = _params(args)
    lm = _load(args)
    stream = not args.no_stream and not args.json and params.num_beams == 1 and params.num_return_sequences == 1
    if stream:
        for delta in lm.stream(prompt, params):
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    res = lm.generate(prompt, params)
    if args.json:
        print(json.dumps(_result_json(lm, res), ensure_ascii=False))
    else:
        for i, s in enumerate(res.sequences):
            if len(res.sequences) > 1:
                print(f"--- sequence {i + 1} (score {s.score:.4f})" if s.score is not None else f"--- sequence {i + 1}")
            print(s.text)
    return 0


def _result_json(lm, res) -> dict:
    out = {"model": res.model or lm.name, "text": res.text, "token_ids": res.token_ids,
           "finish_reason": res.finish_reason, "usage": res.usage,
           "timings": {"load_s": round(lm.load_s, 3), "prefill_tok_s": res.timings.get("prefill_tok_s"),
                       "decode_tok_s": res.timings.get("decode_tok_s")}}
    if res.sequences[0].logprobs is not None:
        out["logprobs"] = logprobs_json(lm.tokenizer, res.sequences[0])
    if len(res.sequences) > 1:
        out["sequences"] = [{"text": s.text, "token_ids": s.token_ids, "score": s.score,
                             "finish_reason": s.finish_reason} for s in res.sequences]
    return out


def _chat(args) -> int:
    with reply_speaker(args) as speak:  # reads replies aloud with --speak / --speak-out, else passes them through
        return _chat_turns(args, speak)


def piped_message() -> str | None:
    """The one message piped on stdin (an empty one is an error), or None when stdin is a terminal."""
    if sys.stdin is None or sys.stdin.isatty():
        return None
    user = sys.stdin.read().strip()
    if not user:
        raise AigcError("empty message on stdin")
    return user


def user_turns():
    """What the user types at ``you> `` line by line (empty lines skipped) until /exit, /quit or end of input."""
    while True:
        try:
            user = input("you> ").strip()
        except EOFError:
            print()
            return
        if user in ("/exit", "/quit"):
            return
        if user:
            yield user


def _chat_turns(args, speak) -> int:
    params = _params(args)
    if args.tools:  # a tool-calling loop (cli/constrain.py)
        return tool_chat(args, params, _load)
    history: list[dict] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    user = piped_message()
    if user is not None:
        lm = _load(args)
        messages = history + [{"role": "user", "content": user}]
        if args.json:
            out = _result_json(lm, lm.chat(messages, params))
            print(json.dumps(out, ensure_ascii=False))
            list(speak([out["text"]]))
            return 0
        for delta in speak(lm.chat_stream(messages, params)):
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    lm = _load(args)
    print(f"chatting with {lm.name} - /exit to leave, /reset to clear the history", file=sys.stderr)
    for user in user_turns():
        if user == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": user})
        sys.stdout.write("assistant> ")
        parts = []
        for delta in speak(lm.chat_stream(history, params)):
            parts.append(delta)
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(parts)})
    return 0


def _score(args) -> int:
    text = _read_arg_or_stdin(args.text, "text")
    res = _load(args).score(text, window=args.window, stride=args.stride)
    if args.json:
        print(json.dumps(res.to_dict()))
    else:
        print(f"nll {res.nll:.4f}  ppl {res.ppl:.3f}  over {res.n_tokens} predicted tokens "
              f"({res.windows} window(s) of {res.window} tokens, stride {res.stride})")
    return 0


def _tokenize(args) -> int:
    from aigckit import store
    from aigckit.text.tokenizer import Tokenizer

    text = _read_arg_or_stdin(args.text, "text")
    res = store.resolve(args.model)
    tok = Tokenizer.from_gguf(res.path) if res.format == "gguf" else Tokenizer.from_dir(res.path)
    ids = tok.encode(text)
    pieces = [tok.id_to_token(i) for i in ids]
    if args.json:
        print(json.dumps({"ids": ids, "pieces": pieces, "n_tokens": len(ids)}, ensure_ascii=False))
    else:
        for i, pc in zip(ids, pieces):
            print(f"{i:>8}  {pc!r}")
        print(f"{len(ids)} tokens")
    return 0
