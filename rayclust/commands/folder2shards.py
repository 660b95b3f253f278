"""Turn a folder of images into WebDataset shards (images in sub-folders get the sub-folder's name as a label).

    python jobs/folder2shards.py --images photos/ --out s3://bucket/raw --prefix photos
"""
from rayclust.cli import JobArgumentParser, at_least


def build_parser() -> JobArgumentParser:
    parser = JobArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", required=True,
                        help="folder of images; those in its sub-folders are labelled with the sub-folder's name")
    parser.add_argument("--out", required=True, help="output folder or s3:// prefix for the .tar shards")
    parser.add_argument("--prefix", default="shard", help="shard file name prefix (default: %(default)s)")
    parser.add_argument("--per-shard", type=at_least(1), default=1000, help="samples per shard (default: %(default)s)")
    return parser


def main() -> None:
    args = build_parser().parse_args()

    from rayclust.shard_writer import write_shards

    uris = write_shards(args.images, args.out, args.prefix, args.per_shard)
    print(f"wrote {len(uris)} shards: {uris[0]} … {uris[-1]}", flush=True)

