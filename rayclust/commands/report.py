"""Write a static HTML report of the LATEST model's clusters: names, sizes, typical and boundary images, a map.

    python jobs/report.py --lake s3://bucket/lake
"""
from rayclust.cli import JobArgumentParser


def build_parser() -> JobArgumentParser:
    parser = JobArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lake", required=True, help="lake root: a local folder or an s3:// prefix")
    parser.add_argument("--out", default=None, metavar="PATH",
                        help="where to write the page, a local path or s3:// (default: "
                             "LAKE/reports/<model_version>/index.html)")
    return parser


def main() -> None:
    args = build_parser().parse_args()

    from rayclust.report import write_report

    print(write_report(args.lake, args.out), flush=True)
