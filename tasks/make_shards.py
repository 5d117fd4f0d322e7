"""Convert a corpus to webdataset shards that pretraining streams (data.streaming: true).

    python tasks/make_shards.py --pairs data/pairs.jsonl --output shards/pairs-%06d.tar [--shard-size 10000]
    python tasks/make_shards.py --images data/images --output shards/images-%06d.tar

--pairs takes jsonl lines {"image": path relative to the file, "text": caption}; each sample becomes
<key>.<image's own extension> (its bytes as they are, not re-encoded) + <key>.txt. --images takes a folder
(recursively). The samples are shuffled with --seed before writing: a stream reads a shard from first sample
to last, so the shuffle here is what mixes neighbouring samples. Bad lines and missing images are skipped
and counted. Each shard is written under a temporary name and renamed when complete. The printed pattern
(e.g. shards/pairs-{000000..000041}.tar) goes into data.sources.pairs or data.sources.images.
"""

import argparse
import random
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--pairs", nargs="+", help="jsonl files of {image, text} lines")
    source.add_argument("--images", help="a folder of images")
    parser.add_argument("--output", required=True, help="shard name with a %%d field, e.g. shards/pairs-%%06d.tar")
    parser.add_argument("--shard-size", type=int, default=10000, help="samples per shard (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle before writing")
    args = parser.parse_args(argv)

    from beit3.data.common import pair_lines
    from beit3.data.images import list_images
    from beit3.data.streaming import write_shards

    if not re.search(r"%0?\d*d", args.output) or not args.output.endswith(".tar"):
        parser.error(f"--output {args.output!r} needs a %d field and a .tar suffix, e.g. shards/pairs-%06d.tar")
    if args.shard_size < 1:
        parser.error(f"--shard-size must be at least 1, not {args.shard_size}")
    if args.pairs:
        records = list(pair_lines(args.pairs))
    else:
        try:
            records = [(path, None) for path in list_images(args.images)]
        except FileNotFoundError as error:
            sys.exit(f"error: {error}")
    random.Random(args.seed).shuffle(records)
    missing = 0

    def samples():
        nonlocal missing
        for number, (path, text) in enumerate(records):
            try:
                data = Path(path).read_bytes()
            except OSError as error:
                missing += 1
                print(f"warning: {path}: {error.strerror or error}; skipped", file=sys.stderr)
                continue
            extension = Path(path).suffix.lower().lstrip(".") or "jpg"
            sample = {"__key__": f"{number:09d}", "jpg" if extension == "jpeg" else extension: data}
            if text is not None:
                sample["txt"] = text
            yield sample

    written = write_shards(samples(), args.output, args.shard_size)
    if not written:
        sys.exit("error: no sample could be written: check the input paths (the warnings above name the bad ones).")
    width = int(re.search(r"%0?(\d*)d", args.output).group(1) or 0)
    pattern = re.sub(r"%0?\d*d", "{" + f"{0:0{width}d}..{len(written) - 1:0{width}d}" + "}", args.output)
    print(
        f"wrote {len(records) - missing} samples in {len(written)} shards: {pattern}"
        + (f" ({missing} skipped)" if missing else "")
    )


if __name__ == "__main__":
    main()
