"""Talk to a trained model: streamed chat, or plain text continuation.

    python eval_model.py --model_path out/pretrain/final                      # continue text (interactive)
    python eval_model.py --model_path out/sft/final --mode chat --system "You are a helpful assistant."
    python eval_model.py --model_path out/pretrain/final --prompt "Once upon a time" --max_new_tokens 100
    python eval_model.py --model_path out/lora/final                          # a LoRA adapter on its base model
    python eval_model.py --model_path out/sft/final --serve                   # OpenAI-compatible server + chat page
    python eval_model.py --model_mode 1 --stream False                        # Zer02LLM's flags: out/sft/final, chat

The folder is what save_pretrained / the trainer writes (config.json + model.safetensors), or a LoRA
adapter folder (adapter_config.json + adapter_model.safetensors): its base model (adapter_config.json's
base_model_name_or_path, or --base_model_path) is loaded and the adapter merged into it.
The tokenizer is read from that folder when it has tokenizer files, else from the repo's
tokenizer/ folder next to this script.

With --serve, the model answers over HTTP instead: OpenAI's /v1/chat/completions, /v1/completions and
/v1/models (so the official `openai` client works unchanged), and a chat page at /. Concurrent requests are
decoded together in one batch (model/engine.py). The sampling flags are the defaults of requests that leave
a field out; --top_k and --repetition_penalty, which OpenAI's API lacks, apply to all.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from data import DataError, load_tokenizer, render_prompt, stop_token_ids
from model import Transformer, generate
from model.generate import DEFAULT_MAX_NEW_TOKENS, answer_budget, decode_stream
from model.lora import ADAPTER_CONFIG, load_adapter, merge_lora, read_adapter_config
from trainer import other_flags
from trainer.config import ArgumentParser, parse_bool
from trainer.distributed import resolve_device, resolve_dtype

REPO_TOKENIZER = Path(__file__).resolve().parent / "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
DEFAULT_HOST, DEFAULT_PORT, DEFAULT_BATCH = "127.0.0.1", 8000, 16
SERVE_ONLY = ("host", "port", "api_key", "max_batch_size")
# --mode's values under Zer02LLM's --model_mode (0 = the pretrained model, 1 = the SFT one), and the stage's
# final model each talks to when --model_path is not given.
MODEL_MODES = {"0": "complete", "pretrain": "complete", "1": "chat", "sft": "chat"}
DEFAULT_MODEL = {"complete": "out/pretrain/final", "chat": "out/sft/final"}
# MiniMind's other --model_mode values pick a model, which --model_path names here.
MODEL_MODE_MODELS = {"2": "its RLHF model: --model_path out/dpo/final", "3": "its reasoning model: --model_path "
                     "with that model's folder", "4": "its RLAIF model: --model_path out/grpo/final"}


def eval_mode(text: str) -> str:
    """A --mode value, or one of --model_mode's (MODEL_MODES) as the --mode it means."""
    if text in MODEL_MODE_MODELS:
        raise argparse.ArgumentTypeError(f"{text} is MiniMind's choice of {MODEL_MODE_MODELS[text]} (with --mode "
                                         "auto, the default, a chat model is chatted with)")
    return MODEL_MODES.get(text, text)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="eval_model.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", default=None, help="model folder (config.json + model.safetensors), or a LoRA "
                   "adapter folder (adapter_config.json + adapter_model.safetensors); default with --mode chat: "
                   f"{DEFAULT_MODEL['chat']}, with --mode complete: {DEFAULT_MODEL['complete']}")
    p.add_argument("--base_model_path", default=None, help="for an adapter folder: the base model folder "
                   "(default: base_model_name_or_path in its adapter_config.json)")
    p.add_argument(
        "--mode", "--model_mode", type=eval_mode, choices=("auto", "chat", "complete"), default="auto",
        help="chat: multi-turn with the tokenizer's chat template; complete: plain continuation; auto (the default): "
        'chat if <model_path>/zero2llm.json has "chat": true (written for SFT/DPO/GRPO models), else complete. '
        "--model_mode is the same flag with Zer02LLM's values: 0 or pretrain = complete, 1 or sft = chat",
    )
    p.add_argument("--stream", type=parse_bool, nargs="?", const=True, default=True, metavar="true|false",
                   help="print the answer as it is generated (the default); false: the whole answer once it is done")
    p.add_argument("--dim", "--n_layers", dest="shape_flags", action="append", default=[], metavar="N",
                   help="Zer02LLM's model-shape flags: not needed, the shape comes from the model folder's config.json "
                   "(a note says so, and they are ignored)")
    p.add_argument("--prompt", default=None, help="answer this one prompt and exit (no interactive loop)")
    p.add_argument("--system", default=None, help="system prompt for chat mode")
    p.add_argument("--max_new_tokens", type=int, default=None, help=f"tokens to generate per answer (default: "
                   f"{DEFAULT_MAX_NEW_TOKENS}, or half the model's context when that is smaller)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default: %(default)s)")
    p.add_argument("--top_k", type=int, default=0, help="sample from the k most likely tokens (default: %(default)s = off)")
    p.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling mass (default: %(default)s; 1.0 = off)")
    p.add_argument("--repetition_penalty", type=float, default=1.0,
                   help=">1 discourages repeating tokens (default: %(default)s = off)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, mps ...")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="auto: bf16 where the hardware has it natively (recent GPUs, CPUs with AVX512-BF16/AMX), "
                   "else fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step: a one-off wait, then "
                   "faster generation (bench/RESULTS.md has the figures); worth it for long answers or many prompts")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    s = p.add_argument_group("serving (--serve)")
    s.add_argument("--serve", action="store_true", help="serve the model over HTTP (OpenAI's API and a chat page) "
                   "until Ctrl-C, instead of chatting in the terminal")
    s.add_argument("--host", default=None, help=f"address to listen on (default: {DEFAULT_HOST}, this machine only; "
                   "0.0.0.0 opens the server to the network)")
    s.add_argument("--port", type=int, default=None, help=f"port to listen on (default: {DEFAULT_PORT})")
    s.add_argument("--api_key", default=None, help="require 'Authorization: Bearer API_KEY' on /v1/ requests "
                   "(default: none required)")
    s.add_argument("--max_batch_size", type=int, default=None, help=f"requests decoded together (default: "
                   f"{DEFAULT_BATCH}); more wait their turn. The KV cache holds this many rows of the model's context")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args, unknown = p.parse_known_args(argv)
    if unknown:  # another project's flags (MiniMind's eval_llm.py): one line each saying what to write here
        other_flags.refuse_unknown(p, unknown, other_flags.EVAL)
    if args.serve:
        for flag, given, why in (
            ("prompt", args.prompt is not None, "clients send their own prompts"),
            ("system", args.system is not None, "clients send their own system messages"),
            ("mode", args.mode != "auto", "the server answers chats at /v1/chat/completions and plain prompts at "
             "/v1/completions"),
            ("compile", args.compile, "the server's batched decode step runs eagerly"),
        ):
            if given:
                p.error(f"--{flag} does not go with --serve: {why}")
        args.host = DEFAULT_HOST if args.host is None else args.host
        args.port = DEFAULT_PORT if args.port is None else args.port
        args.max_batch_size = DEFAULT_BATCH if args.max_batch_size is None else args.max_batch_size
    elif given := next((flag for flag in SERVE_ONLY if getattr(args, flag) is not None), None):
        p.error(f"--{given} is a setting of the server: add --serve")
    rules = {"max_new_tokens": (args.max_new_tokens is None or args.max_new_tokens >= 1, ">= 1"),
             "temperature": (args.temperature >= 0, ">= 0"),
             "top_k": (args.top_k >= 0, ">= 0 (0 = off)"), "top_p": (0 < args.top_p <= 1, "in (0, 1] (1 = off)"),
             "repetition_penalty": (args.repetition_penalty > 0, "> 0 (1 = off)"),
             "port": (args.port is None or 0 <= args.port <= 65535, "in 0..65535"),
             "max_batch_size": (args.max_batch_size is None or args.max_batch_size >= 1, ">= 1"),
             # an unset variable ("$KEY") would make a server that takes an empty key: every client's
             "api_key": (args.api_key is None or args.api_key.strip() != "", "a non-empty key")}
    for flag, (ok, rule) in rules.items():
        if not ok:
            value = getattr(args, flag)
            shown = '""' if value == "" else value
            p.error(f"--{flag} {shown}: must be {rule}")
    if args.model_path is None:
        if args.mode == "auto":
            p.error("--model_path is required (or --mode chat / complete, which talk to "
                    f"{DEFAULT_MODEL['chat']} / {DEFAULT_MODEL['complete']})")
        args.model_path = DEFAULT_MODEL[args.mode]
    return args


def model_tokenizer(model_path: Path, model: Transformer):
    """The model folder's tokenizer if it has one, else the repo's shipped tokenizer/ (said on stderr); refused when
    it has ids the model has no embedding for (another model's tokenizer)."""
    for folder in (model_path, REPO_TOKENIZER):
        if any((folder / f).is_file() for f in TOKENIZER_FILES):
            try:
                tokenizer = load_tokenizer(folder)
            except DataError as e:
                raise SystemExit(f"error: {e}") from None
            if len(tokenizer) > model.config.vocab_size:
                raise SystemExit(f"error: the tokenizer in {folder} has {len(tokenizer):,} tokens but the model in "
                                 f"{model_path} only {model.config.vocab_size:,}: it is another model's; copy the "
                                 "tokenizer the model was trained with into its folder")
            if folder != model_path:
                print(f"[{model_path} has no tokenizer: using {folder}]", file=sys.stderr)
            return tokenizer
    raise SystemExit(
        f"error: no tokenizer found: neither {model_path} nor {REPO_TOKENIZER} has {' or '.join(TOKENIZER_FILES)}; "
        "copy the training tokenizer into the model folder"
    )


def resolve_mode(mode: str, model_path: Path) -> str:
    """auto -> chat when the trainer marked the folder as chat-tuned (zero2llm.json: {"chat": true})."""
    if mode != "auto":
        return mode
    marker = model_path / "zero2llm.json"
    if marker.is_file():
        try:
            return "chat" if json.loads(marker.read_text()).get("chat") else "complete"
        except (json.JSONDecodeError, AttributeError):
            raise SystemExit(f"error: {marker}: not a JSON object; fix it or pass --mode chat/complete") from None
    return "complete"


def answer_tokens(token_stream: Iterable[torch.Tensor], stop: list[int]) -> Iterator[int]:
    """The ids of a one-row generation, up to (not including) its first stop token."""
    for token in token_stream:
        t = int(token[0])
        if t in stop:
            return
        yield t


def stream_answer(tokenizer, token_stream: Iterable[torch.Tensor], stop: list[int], stream: bool = True
                  ) -> tuple[str, bool]:
    """Print the answer as it is generated, whole characters at a time (generate.decode_stream), or with
    stream=False all of it once it is done.

    Returns (the answer, whether Ctrl-C stopped it): a stopped answer is what was generated of it (printed then).
    """
    pieces: list[str] = []
    stopped = False
    try:
        for piece in decode_stream(tokenizer, answer_tokens(token_stream, stop)):
            if stream:
                print(piece, end="", flush=True)
            pieces.append(piece)
    except KeyboardInterrupt:
        stopped = True
    print("" if stream else "".join(pieces), flush=True)
    return "".join(pieces), stopped


def utf8_problem(text: str) -> str | None:
    """Why `text` is not valid UTF-8 (read with surrogateescape, bad bytes are lone surrogates), else None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start].encode("utf-8", "surrogateescape")
        return f"byte 0x{bad.hex()} at character {e.start + 1} is not UTF-8"
    return None


def encode_chat(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The chat so far, rendered with the chat template and the generation prompt (data.render_prompt)."""
    if not tokenizer.chat_template:
        raise SystemExit("error: the tokenizer has no chat_template; use --mode complete or a chat tokenizer")
    return render_prompt(tokenizer, messages)[1]


def encode_completion(tokenizer, prompt: str) -> list[int]:
    """Plain text; a document starts after <|endoftext|> in pretraining data, so start from bos (or eos)."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return ([start] if start is not None else []) + ids


def fit_chat(tokenizer, messages: list[dict[str, str]], budget: int) -> list[int]:
    """The chat's tokens within `budget`: the oldest exchanges are dropped from `messages` (never the system
    prompt or the newest message), since positions past the model's context are ones it never trained on."""
    first = 1 if messages[0]["role"] == "system" else 0
    ids = encode_chat(tokenizer, messages)
    dropped = 0
    while len(ids) > budget and len(messages) - first > 1:
        del messages[first:first + 2]  # one user message and its reply
        dropped += 1
        ids = encode_chat(tokenizer, messages)
    if dropped:
        print(f"[the oldest {dropped} exchange(s) dropped to fit the model's context]", file=sys.stderr)
    return ids


def fit_tail(ids: list[int], budget: int) -> list[int]:
    """A prompt longer than `budget` keeps its last tokens (the ones the continuation follows)."""
    if len(ids) > budget:
        print(f"[prompt cut to its last {budget} of {len(ids)} tokens to fit the model's context]", file=sys.stderr)
    return ids[-budget:]


def load_model(model_path: Path, base_model_path: str | None = None) -> Transformer:
    """A model folder as is (a training checkpoint as trainer/checkpoint.py reads it, so an --fsdp or LoRA run's
    too); an adapter folder as its base model with the adapter merged in (fp32). Either in eval mode with frozen
    weights: nothing trains them, and frozen bf16 weights are what the model packs for fast products on CPUs
    (model/cpu_linear.py)."""
    if not (model_path / ADAPTER_CONFIG).is_file():
        if base_model_path is not None and (model_path / "config.json").is_file():
            raise ValueError(f"--base_model_path is for a LoRA adapter folder; {model_path} is a whole model: drop it")
        if not (model_path / "config.json").is_file() and (model_path / "final").is_dir():
            raise FileNotFoundError(f"{model_path} is a training run's folder: its model is {model_path / 'final'} "
                                    "(or best/); pass that as --model_path")
        if (model_path / "trainer_state.json").is_file():  # a training checkpoint (trainer/checkpoint.py STATE_FILE)
            from trainer.checkpoint import CheckpointError, read_model  # torch's DCP: slow to import

            try:
                return read_model(model_path).eval().requires_grad_(False)
            except CheckpointError as e:
                raise ValueError(str(e)) from None
        return Transformer.from_pretrained(model_path).eval().requires_grad_(False)
    base = base_model_path or read_adapter_config(model_path).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{model_path / ADAPTER_CONFIG}: no base_model_name_or_path; pass --base_model_path")
    try:
        model = Transformer.from_pretrained(base)
    except FileNotFoundError as e:
        fix = ("point --base_model_path at the model the adapter was trained on" if base_model_path else
               "its adapter_config.json names this folder: pass --base_model_path")
        raise FileNotFoundError(f"base model of the adapter {model_path}: {e}; {fix}") from None
    return merge_lora(load_adapter(model, model_path)).eval().requires_grad_(False)


def read_line(prompt: str) -> str | None:
    """The user's next line; None at Ctrl-D or Ctrl-C (the session ends). A line that is not UTF-8 is refused
    with one line, and the next one is read."""
    while True:
        try:
            line = input(prompt)
        except (EOFError, KeyboardInterrupt):
            print()
            return None
        problem = utf8_problem(line)
        if problem is None:
            return line
        print(f"[that line is not UTF-8 text ({problem}); type it again]", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.prompt is not None and (problem := utf8_problem(args.prompt)):
        raise SystemExit(f"error: --prompt is not UTF-8 text ({problem}); pass it in UTF-8")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    sock = server_socket(args) if args.serve else None  # a port already taken fails now, not after loading
    model_path = Path(args.model_path)
    try:
        device = resolve_device(args.device)
        model = load_model(model_path, args.base_model_path).to(device=device, dtype=resolve_dtype(args.dtype, device))
        max_new_tokens, note = answer_budget(model.config.max_seq_len, args.max_new_tokens)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {'--' if str(e).startswith('max_new_tokens') else ''}{e}") from None
    tokenizer = model_tokenizer(model_path, model)
    stop = stop_token_ids(tokenizer, model.config.eos_token_id, model.generation_config)
    if args.shape_flags:
        c = model.config
        print(f"[--dim/--n_layers are not needed: the shape comes from the model's config.json (dim {c.dim}, "
              f"{c.n_layers} layers); ignored]", file=sys.stderr)
    if args.serve:
        return serve_http(args, sock, model, tokenizer, stop, max_new_tokens)
    if note:
        print(f"[{note}; --max_new_tokens changes it]", file=sys.stderr)
    mode = resolve_mode(args.mode, model_path)
    if args.system is not None and mode == "complete":
        why = ("--mode complete" if args.mode == "complete" else
               "this model is not chat-tuned (--mode auto chose complete)")
        raise SystemExit(f"error: --system is a chat's system message, and {why}: drop it, or add --mode chat")
    budget = model.config.max_seq_len - max_new_tokens  # prompt tokens that leave room for the answer
    sampling = dict(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, eos_token_id=stop, compile=args.compile,
    )

    def answer(ids: list[int]) -> tuple[str, bool]:
        input_ids = torch.tensor([fit_tail(ids, budget)], dtype=torch.long, device=device)
        return stream_answer(tokenizer, generate(model, input_ids, max_new_tokens, **sampling), stop, args.stream)

    messages: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:  # one answer, then exit
        if mode == "chat":
            ids = fit_chat(tokenizer, [*messages, {"role": "user", "content": args.prompt}], budget)
        else:
            print(args.prompt, end="", flush=True)
            ids = encode_completion(tokenizer, args.prompt)
        if answer(ids)[1]:
            raise KeyboardInterrupt
        return
    print(f"[{mode} mode, {model.num_params() / 1e6:.1f}M params on {device}; Ctrl-C stops an answer; "
          f"'exit', Ctrl-D or Ctrl-C here quits]")
    if isinstance(sys.stdin, io.TextIOWrapper):  # bytes that are not UTF-8 reach utf8_problem, not a traceback
        sys.stdin.reconfigure(errors="surrogateescape")
    while (user := read_line("\n>>> " if mode == "chat" else "\nprompt> ")) is not None \
            and user.strip() not in ("exit", "quit"):
        if mode == "chat":
            messages.append({"role": "user", "content": user})
            reply, stopped = answer(fit_chat(tokenizer, messages, budget))
            messages.append({"role": "assistant", "content": reply})  # a stopped answer: what was printed of it
        else:
            print(user, end="", flush=True)
            stopped = answer(encode_completion(tokenizer, user))[1]
        if stopped:  # Ctrl-C stops this answer only; the session goes on
            print("[answer stopped]", file=sys.stderr)


def server_socket(args: argparse.Namespace) -> socket.socket:
    """The socket --serve listens on (--host, --port)."""
    try:
        from serve.app import listen
    except ImportError as e:
        raise SystemExit(f"error: --serve needs {e.name}: pip install -r requirements.txt") from None
    return listen(args.host, args.port)


def serve_http(args: argparse.Namespace, sock: socket.socket, model: Transformer, tokenizer, stop: list[int],
               max_new_tokens: int) -> None:
    """--serve: answer over HTTP until Ctrl-C. A request without max_tokens gets the terminal's answer length
    (--max_new_tokens, or the default: 256 or half the context), shrunk to what its prompt leaves of the context."""
    import serve as http
    from model.engine import Engine

    defaults = http.Defaults(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                             repetition_penalty=args.repetition_penalty, max_tokens=max_new_tokens)
    http.run(Engine(model, args.max_batch_size), tokenizer, stop, args.model_path, defaults, sock, args.api_key)


def cli() -> None:
    """`python eval_model.py`: Ctrl-C while loading or during a one-shot answer exits quietly (130, the shell's
    code for SIGINT), not with a traceback; so does a reader that stops reading (`... | head`)."""
    try:
        main()
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        # The reader is gone: what is still buffered for stdout cannot be written either (Python's documented way).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)  # the shell's code for SIGPIPE


if __name__ == "__main__":
    cli()
