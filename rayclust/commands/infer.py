"""Label every feature row of the lake with the LATEST model: LAKE/labels/ (key -> cluster).

An image model (pyramid) labels the images of the shards it was trained on (its --shards).

    python jobs/infer.py --lake s3://bucket/lake
"""
import sys

from rayclust.cli import JobArgumentParser, at_least, fraction


def build_parser() -> JobArgumentParser:
    parser = JobArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lake", required=True, help="lake root: a local folder or an s3:// prefix")
    parser.add_argument("--batch-size", type=at_least(1), default=None,
                        help="rows per inference batch (default: 1024 feature rows; for an image model, the "
                             "images per step it trained with)")
    parser.add_argument("--redo", action="store_true",
                        help="label every shard again, even those this model already labelled from the same "
                             "features (by default a run again does only what is missing)")
    parser.add_argument("--vocabulary", default=None, metavar="FILE",
                        help="open_clip encoders: name clusters from these words, one per line (default: the "
                             "ImageNet-1k class names; effnet-lite0 always names them with its ImageNet classes)")
    parser.add_argument("--duplicate-epsilon", type=fraction, default=0.05, metavar="EPSILON",
                        help="mark as a near-duplicate (labels' duplicate_of) each image with a more typical image "
                             "of its cluster at cosine similarity >= 1 - EPSILON; 0: none (default: %(default)s, "
                             "NeMo Curator's semantic dedup default)")
    return parser


def main() -> None:
    args = build_parser().parse_args()

    from rayclust.labels import infer

    summary = infer(args.lake, args.batch_size, redo=args.redo, vocabulary=args.vocabulary,
                    duplicate_epsilon=args.duplicate_epsilon)
    if summary.failures:
        sys.exit(1)

