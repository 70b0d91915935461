"""The data command line: `python data.py prepare --input corpus.jsonl --tokenizer tokenizer --output corpus.bin`
tokenizes .jsonl/.parquet/.txt documents into a .bin token file (+ .json sidecar) for pretraining.

The code lives in the data/ package next to this script; `import data` finds that package, never this file
(a folder wins over a module of the same name).
"""

from __future__ import annotations

import argparse

from data import DataError, data_files, load_tokenizer, prepare_pretrain, summary

SOURCE_SUFFIXES = (".jsonl", ".parquet", ".txt")  # the documents prepare tokenizes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Zero2LLM data tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="tokenize .jsonl/.parquet/.txt documents into a flat .bin token file for "
                          "pretraining")
    prep.add_argument("--input", nargs="+", required=True,
                      help=".jsonl ({'text': ...} per line), .parquet (a 'text' column) or .txt files; as train.py's "
                      "--data_path, each may be a folder (its such files, sorted by name), a glob or a comma list")
    prep.add_argument("--tokenizer", "--tokenizer_path", default="tokenizer",
                      help="tokenizer folder (default: tokenizer); --tokenizer_path is the same flag (train.py's name)")
    prep.add_argument("--output", required=True, help="output .bin path (a .json sidecar is written next to it)")
    prep.add_argument("--skip_bad_records", action="store_true",
                      help="skip malformed lines (counted per reason) instead of stopping at the first one")
    args = parser.parse_args(argv)
    try:
        inputs = [f for spec in args.input for f in data_files(spec, SOURCE_SUFFIXES)]
        out = prepare_pretrain(list(dict.fromkeys(inputs)), load_tokenizer(args.tokenizer), args.output,
                               skip_bad_records=args.skip_bad_records)
    except DataError as e:
        parser.exit(1, f"error: {e}\n")
    print(summary(out))


if __name__ == "__main__":
    main()
