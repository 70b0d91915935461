"""The shipped tokenizer: loads offline, round-trips any text, renders ChatML, masks assistant turns."""

import importlib.util
import json
import subprocess
import sys
from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import CONVERSATION, ROOT, TOKENIZER, write_jsonl, write_parquet
from data import DataError

spec = importlib.util.spec_from_file_location("train_tokenizer", TOKENIZER / "train_tokenizer.py")
train_tokenizer = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_tokenizer)


TOOL_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
# A MiniMind-3 tool-calling chat, as its sft data writes it (tools and tool calls as JSON text).
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "查询城市天气",
                                                 "parameters": {"type": "object",
                                                                "properties": {"city": {"type": "string"}}}}}
TOOL_CHAT = [
    {"role": "system", "content": "你是一个乐于助人的助手。"},
    {"role": "user", "content": "北京今天天气怎么样？"},
    {"role": "assistant", "content": "", "reasoning_content": "用户想知道北京的天气，我需要调用工具。",
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}}]},
    {"role": "tool", "content": '{"city": "北京", "weather": "晴", "temperature": "25°C"}'},
    {"role": "assistant", "content": "北京今天晴，气温25°C。"},
]
# What Qwen2.5's template writes for it (and Qwen3's for the reasoning), by hand.
TOOL_CHAT_TEXT = (
    "<|im_start|>system\n你是一个乐于助人的助手。\n\n# Tools\n\nYou may call one or more functions to assist with the "
    "user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    + json.dumps(WEATHER_TOOL, ensure_ascii=False) + "\n</tools>\n\nFor each function call, return a json object "
    "with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": "
    "<function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n"
    "<|im_start|>user\n北京今天天气怎么样？<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n用户想知道北京的天气，我需要调用工具。\n</think>\n\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call><|im_end|>\n'
    '<|im_start|>user\n<tool_response>\n{"city": "北京", "weather": "晴", "temperature": "25°C"}\n'
    "</tool_response><|im_end|>\n"
    "<|im_start|>assistant\n北京今天晴，气温25°C。<|im_end|>\n")


def test_special_token_ids(tok):
    assert len(tok) == 6400
    ids = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"])
    assert ids == [0, 1, 2, 3, 4]
    assert tok.convert_tokens_to_ids(TOOL_TOKENS) == [6396, 6397, 6398, 6399]  # the last ids: the BPE's are kept
    assert tok.eos_token == tok.pad_token == "<|endoftext|>" and tok.eos_token_id == tok.pad_token_id == 0
    assert tok.bos_token is None
    config = json.loads((TOKENIZER / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["add_bos_token"] is False


def test_no_bos_added_and_specials_not_split(tok):
    assert tok("hello")["input_ids"] == tok.encode("hello", add_special_tokens=False)
    for i, t in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]):
        assert tok.encode(t) == [i]
        ids = tok.encode(f"a{t}b")
        assert ids.count(i) == 1 and len(ids) == 3


def test_think_tokens_survive_skip_special_tokens(tok):
    ids = tok.encode("<|im_start|>assistant\n<think>\n1 + 1 = 2\n</think>\n2<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n<think>\n1 + 1 = 2\n</think>\n2"


def test_tool_tokens_are_single_and_survive_skip_special_tokens(tok):
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>'
    ids = tok.encode(text)
    assert [ids.count(i) for i in tok.convert_tokens_to_ids(TOOL_TOKENS[:2])] == [1, 1]
    assert tok.decode(ids, skip_special_tokens=True) == text
    for i, t in enumerate(TOOL_TOKENS):
        assert tok.encode(t) == [6396 + i]


def test_tool_calling_chat_renders_as_qwen_templates_do(tok):
    """tools in the system turn, the call in <tool_call>, the result as a <tool_response> user turn, the
    reasoning in <think> before the reply; and the same whether tools and calls come as objects or JSON text."""
    assert tok.apply_chat_template(TOOL_CHAT, tools=[WEATHER_TOOL], tokenize=False) == TOOL_CHAT_TEXT
    minimind = [dict(m) for m in TOOL_CHAT]
    minimind[2]["tool_calls"] = '[{"name": "get_weather", "arguments": {"city": "北京"}}]'
    from data import chat_messages, render_prompt, tools_of

    minimind[0]["tools"] = json.dumps([WEATHER_TOOL], ensure_ascii=False)
    messages = chat_messages(minimind, "conversations", ROOT / "x.jsonl", 1)
    assert tok.apply_chat_template(messages, tools=tools_of(messages), tokenize=False) == TOOL_CHAT_TEXT
    # Two results in a row share one user turn; the generation prompt follows the last one.
    two = TOOL_CHAT[:3] + [TOOL_CHAT[3], {"role": "tool", "content": "ok"}]
    prompt = render_prompt(tok, [{**two[0], "tools": [WEATHER_TOOL]}, *two[1:]])[0]
    assert prompt.endswith('<|im_start|>user\n<tool_response>\n{"city": "北京", "weather": "晴", "temperature": '
                           '"25°C"}\n</tool_response>\n<tool_response>\nok\n</tool_response><|im_end|>\n'
                           '<|im_start|>assistant\n')


def test_tools_without_a_system_message_get_a_system_turn(tok):
    text = tok.apply_chat_template(TOOL_CHAT[1:2], tools=[WEATHER_TOOL], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n# Tools\n\nYou may call") and text.endswith(
        "<|im_start|>user\n北京今天天气怎么样？<|im_end|>\n<|im_start|>assistant\n")


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_any_text(tok, text):
    ids = tok.encode(text)
    assert tok.unk_token_id is None or tok.unk_token_id not in ids
    assert tok.decode(ids) == text


@pytest.mark.parametrize("text", ["Héllo wörld 🤖 中文 \t\r\n  x", " leading and trailing spaces  ", "a .b , c",
                                  "\x00\x7f\u200b\ufeff", "<|im_end|><|endoftext|>", "12345 + 678 = 13023."])
def test_round_trip_edge_cases(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_digits_are_single_tokens(tok):
    assert [tok.decode([i]) for i in tok.encode("2024")] == ["2", "0", "2", "4"]


def test_chat_template_exact_string(tok):
    text = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nWhat is 12 + 7?<|im_end|>\n"
                    "<|im_start|>assistant\n12 + 7 = 19.<|im_end|>\n"
                    "<|im_start|>user\nAnd if you add 3 more?<|im_end|>\n"
                    "<|im_start|>assistant\n19 + 3 = 22.<|im_end|>\n")
    prompt = tok.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                      "<|im_start|>user\nWhat is 12 + 7?<|im_end|>\n<|im_start|>assistant\n")


def test_apply_chat_template_return_types(tok):
    """transformers changed these across versions: pin what the trainer relies on."""
    assert isinstance(tok.apply_chat_template(CONVERSATION, tokenize=False), str)
    out = tok.apply_chat_template(CONVERSATION, tokenize=True)
    assert isinstance(out, Mapping) and isinstance(out["input_ids"], list) and isinstance(out["input_ids"][0], int)
    out = tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)
    assert out["input_ids"] == tok.encode(tok.apply_chat_template(CONVERSATION, tokenize=False))


def test_assistant_mask_token_by_token(tok):
    """Mask = each assistant content + its <|im_end|>; never the role header, the "\\n" after it, or other turns."""
    out = tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    expected_ids, expected_mask = [], []
    for m in CONVERSATION:
        header = tok.encode(f"<|im_start|>{m['role']}\n")
        body = tok.encode(m["content"] + "<|im_end|>")
        trained = int(m["role"] == "assistant")
        expected_ids += header + body + tok.encode("\n")
        expected_mask += [0] * len(header) + [trained] * len(body) + [0]
    assert ids == expected_ids
    assert mask == expected_mask
    masked = [i for i, keep in zip(ids, mask) if keep]
    assert tok.decode(masked) == "12 + 7 = 19.<|im_end|>19 + 3 = 22.<|im_end|>"


def test_training_is_deterministic(tmp_path):
    texts = ["To be, or not to be, that is the question.", "What is 12 + 7?", "12 + 7 = 19."] * 20
    a = train_tokenizer.build_tokenizer(iter(texts), vocab_size=300)
    b = train_tokenizer.build_tokenizer(iter(texts), vocab_size=300)
    assert a.to_str() == b.to_str()
    assert [a.token_to_id(t) for t in ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]] == [
        0, 1, 2, 3, 4]
    n = a.get_vocab_size()  # this small corpus runs out of merges before 300: the tool tokens still come last
    assert [a.token_to_id(t) for t in TOOL_TOKENS] == list(range(n - 4, n))
    train_tokenizer.save(a, tmp_path / "a")
    train_tokenizer.save(b, tmp_path / "b")
    for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_shipped_files_are_reproducible(tmp_path):
    """Retraining on the shipped dataset/ files gives the shipped tokenizer byte for byte (~2 s)."""
    data = [ROOT / "dataset" / f for f in ("pretrain.jsonl", "sft.jsonl", "dpo.jsonl", "grpo.jsonl")]
    tok = train_tokenizer.build_tokenizer(train_tokenizer.corpus_texts(data), vocab_size=6400)
    train_tokenizer.save(tok, tmp_path)
    for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
        assert (tmp_path / name).read_bytes() == (TOKENIZER / name).read_bytes(), name


def test_the_tool_tokens_keep_every_learned_id():
    """The tool tokens take the last ids, after a BPE of 4 fewer tokens: that BPE is the first part of the one
    without them (the same ids, the same merges in the same order), so a model of the tokenizer before the tool
    tokens reads every other id as it did."""
    texts = list(train_tokenizer.corpus_texts([ROOT / "dataset" / "dpo_trl.jsonl"])) + ["床前明月光，疑是地上霜。"] * 20
    small = json.loads(train_tokenizer.build_tokenizer(iter(texts), vocab_size=400).to_str())["model"]
    big = json.loads(train_tokenizer.build_tokenizer(iter(texts), vocab_size=404).to_str())["model"]
    assert len(small["vocab"]) == 396 and len(big["vocab"]) == 400  # the corpus has merges to spare
    assert small["vocab"] == {t: i for t, i in big["vocab"].items() if i < 396}
    assert big["merges"][:len(small["merges"])] == small["merges"]


def test_train_tokenizer_takes_txt(tmp_path):
    """A plain-text corpus, documents separated by <|endoftext|> lines: the separators are not learned as text."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("床前明月光，疑是地上霜。\n举头望明月，低头思故乡。\n<|endoftext|>\nTo be, or not to be.\n" * 30,
                      encoding="utf-8")
    assert "<|endoftext|>\n" not in list(train_tokenizer.corpus_texts([corpus]))
    out = tmp_path / "tok"
    done = subprocess.run([sys.executable, str(TOKENIZER / "train_tokenizer.py"), "--data", str(corpus),
                           "--vocab_size", "320", "--out_dir", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    from transformers import AutoTokenizer

    trained = AutoTokenizer.from_pretrained(str(out))
    assert len(trained) == 320 and trained.decode(trained.encode("低头思故乡")) == "低头思故乡"
    bad = subprocess.run([sys.executable, str(TOKENIZER / "train_tokenizer.py"), "--data", str(tmp_path / "x.csv")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "x.csv: no such file" in bad.stderr.splitlines()[-1]


def test_train_tokenizer_takes_a_datasets_parquet_files(tmp_path):
    """A Hugging Face dataset's .parquet rows give the texts, and so the tokenizer, of the same rows as .jsonl
    lines: documents, chats (fields a message lacks come back from Arrow as None: skipped) and TRL preference
    pairs, in one file. A line that is not JSON or not UTF-8, and a file that is not Parquet, each get one line
    naming them."""
    lines = [ROOT / "dataset" / f for f in ("pretrain.jsonl", "sft.jsonl", "dpo_trl.jsonl")]
    rows = [json.loads(line) for path in lines for line in path.read_text(encoding="utf-8").splitlines()[:60]]
    rows.insert(70, {"conversations": TOOL_CHAT})  # fields only some messages have: reasoning, tool calls
    jsonl, parquet = write_jsonl(tmp_path / "rows.jsonl", rows), write_parquet(tmp_path / "rows.parquet", rows, 50)
    texts = list(train_tokenizer.corpus_texts([parquet]))
    assert texts == list(train_tokenizer.corpus_texts([jsonl])) and len(texts) > 180
    runs = {}
    for path in (jsonl, parquet):
        out = tmp_path / path.suffix[1:]
        done = subprocess.run([sys.executable, str(TOKENIZER / "train_tokenizer.py"), "--data", str(path),
                               "--vocab_size", "400", "--out_dir", str(out)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        runs[path.suffix] = (out / "tokenizer.json").read_bytes()
    assert runs[".parquet"] == runs[".jsonl"]
    for name, content, expected in (
            ("bad.jsonl", b'{"text": "a"}\n\n{"text": \n', "bad.jsonl line 3: malformed JSON"),
            ("latin1.txt", "a\ncaf\u00e9\n".encode("latin-1"), "latin1.txt line 2: not valid UTF-8"),
            ("fake.parquet", b"not parquet", "fake.parquet: not a readable Parquet file")):
        (tmp_path / name).write_bytes(content)
        bad = subprocess.run([sys.executable, str(TOKENIZER / "train_tokenizer.py"), "--data", str(tmp_path / name),
                              "--out_dir", str(tmp_path / "never")], capture_output=True, text=True)
        assert bad.returncode == 1 and expected in bad.stderr.strip().splitlines()[-1], bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "never").exists()


def test_train_tokenizer_reads_alpaca_and_sharegpt_lines_and_refuses_a_file_with_no_text(tmp_path):
    """train.py --mode sft takes Alpaca's and ShareGPT's lines: their text trains the tokenizer too. A file whose
    lines hold none of the fields read (a classifier's {"Text", "Label"}) is refused naming its fields, where it
    used to leave a tokenizer of bytes alone and exit 0."""
    alpaca = {"instruction": "请写一篇关于保护环境的文章", "input": "不少于十个字", "output": "保护环境是我们每个人的责任。",
              "system": "你是助手"}
    sharegpt = {"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好，有什么可以帮你？"}]}
    path = write_jsonl(tmp_path / "mixed.jsonl", [alpaca, sharegpt])
    assert list(train_tokenizer.corpus_texts([path])) == [
        "请写一篇关于保护环境的文章", "不少于十个字", "保护环境是我们每个人的责任。", "你是助手", "你好", "你好，有什么可以帮你？"]
    other = write_jsonl(tmp_path / "spam.jsonl", [{"Text": "win a prize", "Label": 1}] * 3)
    with pytest.raises(DataError, match="spam.jsonl: no text read: its lines have Label, Text; the text is read "
                                        "from text, "):
        list(train_tokenizer.corpus_texts([path, other]))
    done = run_train_tokenizer("--data", str(other), "--out_dir", str(tmp_path / "never"))
    assert done.returncode == 1 and "no text read" in done.stderr and not (tmp_path / "never").exists()


def run_train_tokenizer(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOKENIZER / "train_tokenizer.py"), *args], capture_output=True,
                          text=True)


def test_train_tokenizer_replaces_a_tokenizer_only_when_told(tmp_path):
    """Models and tokenized data need the tokenizer they were made with: a folder that holds one (the shipped
    tokenizer/ is the default --out_dir) is left as it is, with one line saying what to pass, unless --overwrite.
    Other data is refused before training; the default run, which reproduces the shipped files, writes them where
    they are the same and is refused where they differ."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join((ROOT / "dataset" / "pretrain.jsonl").read_text(encoding="utf-8").splitlines(True)[:100]),
                      encoding="utf-8")
    out = tmp_path / "tok"
    assert run_train_tokenizer("--data", str(corpus), "--vocab_size", "300", "--out_dir", str(out)).returncode == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    again = run_train_tokenizer("--data", str(corpus), "--vocab_size", "320", "--out_dir", str(out))
    assert again.returncode == 2 and {p.name: p.read_bytes() for p in out.iterdir()} == first
    assert again.stderr.strip().splitlines()[-1] == (
        f"train_tokenizer.py: error: --out_dir {out} already holds a tokenizer (tokenizer.json), which models and "
        "tokenized data made with it need as it is; pass --overwrite to replace it, or choose another --out_dir")
    replaced = run_train_tokenizer("--data", str(corpus), "--vocab_size", "320", "--out_dir", str(out), "--overwrite")
    assert replaced.returncode == 0 and len(json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]) == 316

    shipped = tmp_path / "shipped"
    shipped.mkdir()
    for name in train_tokenizer.FILES:
        (shipped / name).write_bytes((TOKENIZER / name).read_bytes())
    assert run_train_tokenizer("--out_dir", str(shipped)).returncode == 0  # the same bytes: nothing to refuse
    assert all((shipped / name).read_bytes() == (TOKENIZER / name).read_bytes() for name in train_tokenizer.FILES)
    edited = (TOKENIZER / "tokenizer_config.json").read_text().replace('"padding_side": "right"',
                                                                      '"padding_side": "left"')
    (shipped / "tokenizer_config.json").write_text(edited)
    differs = run_train_tokenizer("--out_dir", str(shipped))
    assert differs.returncode == 2 and "already holds a different tokenizer" in differs.stderr.splitlines()[-1]
    assert (shipped / "tokenizer_config.json").read_text() == edited


def test_train_tokenizer_reads_folders_and_lists_and_answers_sentencepieces_flags(tmp_path):
    """--data takes what train.py's --data_path takes (a folder, a comma-separated list); a size the data cannot
    fill is said, one below the bytes and added tokens refused; SentencePiece's flags get what to write here."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    lines = (ROOT / "dataset" / "pretrain.jsonl").read_text(encoding="utf-8").splitlines(True)
    (corpus / "a.jsonl").write_text("".join(lines[:60]), encoding="utf-8")
    (corpus / "b.jsonl").write_text("".join(lines[60:120]), encoding="utf-8")
    (corpus / "notes.md").write_text("not data")
    by_folder, by_list = tmp_path / "folder", tmp_path / "list"
    for data, out in ((str(corpus), by_folder), (f"{corpus / 'a.jsonl'},{corpus / 'b.jsonl'}", by_list)):
        assert run_train_tokenizer("--data", data, "--vocab_size", "400", "--out_dir", str(out)).returncode == 0
    assert (by_folder / "tokenizer.json").read_bytes() == (by_list / "tokenizer.json").read_bytes()

    small = tmp_path / "small.txt"
    small.write_text("hello world\n")
    short = run_train_tokenizer("--data", str(small), "--vocab_size", "300", "--out_dir", str(tmp_path / "s"))
    size = len(json.loads((tmp_path / "s" / "tokenizer.json").read_text())["model"]["vocab"]) + 4  # + tool tokens
    assert short.returncode == 0 and size < 300
    assert f"the vocabulary is {size}, not 300; add text for a larger one" in short.stderr
    tiny = run_train_tokenizer("--data", str(small), "--vocab_size", "5", "--out_dir", str(tmp_path / "t"))
    assert tiny.returncode == 2 and "--vocab_size 5: must be at least 265" in tiny.stderr.splitlines()[-1]
    assert not (tmp_path / "t").exists()

    spm = run_train_tokenizer("--corpus_path", str(small), "--model_type", "unigram", "--output_path_prefix", "x")
    assert spm.returncode == 2 and spm.stderr.splitlines()[-3:] == [
        f"train_tokenizer.py: error: --corpus_path is SentencePiece's name: use --data {small}",
        "--model_type is SentencePiece's: the tokenizer is byte-level BPE (every text encodes, no unknown token): "
        "drop it",
        "--output_path_prefix is SentencePiece's: --out_dir, a folder (tokenizer.json, tokenizer_config.json, ...)"]
