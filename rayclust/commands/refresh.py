"""Embed and label only the new or changed shards of a source, with the LATEST model.

    python jobs/refresh.py --shards 's3://bucket/raw/*.tar' --lake s3://bucket/lake

Exit status: 0 done; 1 an error, or the lake is locked by another job; 2 a bad flag;
3 drift detected (only with --fail-on-drift); 4 some shards failed (the next run retries them).
"""
import sys

from rayclust.cli import JobArgumentParser, add_thumbnails_flag, at_least, fraction


def build_parser() -> JobArgumentParser:
    parser = JobArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", required=True,
                        help="shard URI pattern: local path or s3://, with {000..099} ranges and/or globs")
    parser.add_argument("--lake", required=True, help="lake root: a local folder or an s3:// prefix")
    parser.add_argument("--batch-size", type=at_least(1), default=256,
                        help="images per encoder batch (default: %(default)s)")
    parser.add_argument("--infer-batch-size", type=at_least(1), default=1024,
                        help="rows per inference batch (default: %(default)s)")
    parser.add_argument("--max-shards", type=at_least(1), default=None,
                        help="process at most this many new or changed shards in this run (the rest wait for the "
                             "next one), to fit a scheduler's deadline (default: all)")
    parser.add_argument("--max-confidence-drop", type=fraction, default=0.1,
                        help="drift if the new shards' mean confidence is lower than the baseline's by "
                             "more than this (default: %(default)s)")
    parser.add_argument("--max-cluster-shift", type=fraction, default=0.25,
                        help="drift if the cluster-size distributions differ by more than this total "
                             "variation distance (default: %(default)s)")
    add_thumbnails_flag(parser)
    parser.add_argument("--fail-on-drift", action="store_true",
                        help="exit with status 3 when drift is detected (default: off: drift is reported and the "
                             "exit status stays 0)")
    parser.add_argument("--lock-ttl", type=at_least(10), default=300,
                        help="seconds the lake lock's lease lasts without renewal; a crashed holder blocks "
                             "others at most this long (default: %(default)s)")
    return parser


def main() -> None:
    args = build_parser().parse_args()

    from rayclust.refresh import RefreshSettings, refresh

    report = refresh(RefreshSettings(args.shards, args.lake, args.batch_size, args.infer_batch_size,
                                     args.max_shards, args.max_confidence_drop, args.max_cluster_shift,
                                     args.lock_ttl, args.thumbnails))
    print(report, flush=True)
    sys.exit(report.exit_code(args.fail_on_drift))

