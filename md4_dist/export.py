"""Export a trained model: safetensors weights, config.json, its tokenizer and the code
transformers runs, in one directory that `md4_dist.load_pretrained` reads on any device and
`transformers.AutoModel.from_pretrained(dir, trust_remote_code=True)` loads where md4_dist is not
installed (md4_dist/inference/pretrained.py has the layout, md4_dist/hf the transformers model).
Exporting needs no transformers.

    python -m md4_dist.export --checkpoint runs/owt --out exported/owt       # the EMA weights
    python -m md4_dist.export --checkpoint s3://bucket/runs/owt --out s3://bucket/models/owt --no-ema
"""

from __future__ import annotations

import argparse
import sys

from md4_dist import cli
from md4_dist.data.storage import join, list_dir
from md4_dist.inference.consolidate import open_checkpoint
from md4_dist.inference.pretrained import CONFIG, export


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m md4_dist.export", description=__doc__.split("\n\n")[0])
    cli.add_checkpoint_args(ap)
    ap.add_argument("--out", required=True, help="output directory: local path, s3://, gs://")
    ap.add_argument("--overwrite", action="store_true", help="replace a model already exported to --out")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    held = list_dir(args.out)
    if held and not args.overwrite:
        raise FileExistsError(f"--out {args.out} is not empty; pass --overwrite to replace the model "
                              "exported there")
    if held and CONFIG not in held:
        raise FileExistsError(f"--out {args.out} holds files but no exported model ({CONFIG}); "
                              "--overwrite replaces only an export")

    with open_checkpoint(args.checkpoint) as ckpt:
        export(ckpt, args.out, ema=not args.no_ema, tokenizer_url=args.tokenizer)
    print(f"exported step {ckpt.step} ({'trained' if args.no_ema else 'EMA'} weights) of "
          f"{ckpt.url} to {args.out}; load it with md4_dist.load_pretrained({args.out!r}) or "
          f"transformers.AutoModel.from_pretrained({args.out!r}, trust_remote_code=True), "
          f"its config is {join(args.out, CONFIG)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
