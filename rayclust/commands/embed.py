"""Embed WebDataset shards into the lake's feature table (clean + augmented-view features).

    python jobs/embed.py --shards 's3://bucket/raw/{000000..000099}.tar' --lake s3://bucket/lake
"""
import sys

from rayclust.cli import JobArgumentParser, add_thumbnails_flag, at_least


def build_parser() -> JobArgumentParser:
    parser = JobArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", required=True,
                        help="shard URI pattern: local path or s3://, with {000..099} ranges and/or globs")
    parser.add_argument("--lake", required=True, help="lake root: a local folder or an s3:// prefix")
    parser.add_argument("--encoder", default="open_clip:ViT-B-32:openai",
                        help="open_clip:MODEL:PRETRAINED (tag, checkpoint path or 'none'; its image size is the "
                             "model's: 224 px for ViT-B-32) or effnet-lite0[:SIZE] (SIZE in px, 32 to 1024, default "
                             "224; the weights ship with pip: offline) (default: %(default)s)")
    parser.add_argument("--views", type=at_least(0), default=2,
                        help="augmented views embedded per image besides the clean one; 0 for models that read "
                             "only the clean embedding and its neighbours (default: %(default)s)")
    parser.add_argument("--batch-size", type=at_least(1), default=256,
                        help="images per encoder batch (default: %(default)s)")
    add_thumbnails_flag(parser)
    parser.add_argument("--redo", action="store_true",
                        help="embed shards again even if their features were made from the same file with the "
                             "same encoder and views (by default a run again does only what is missing)")
    return parser


def main() -> None:
    args = build_parser().parse_args()

    from rayclust.features import embed

    summary = embed(args.shards, args.lake, args.encoder, args.views, args.batch_size, args.redo, args.thumbnails)
    print(summary, flush=True)
    if summary.failures:
        sys.exit(1)

