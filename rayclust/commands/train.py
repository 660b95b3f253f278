"""Train a contrastive-clustering model with Ray Train: on the lake's features, or on images (pyramid).

    python jobs/train.py --lake s3://bucket/lake --model mfavb --clusters 10
    python jobs/train.py --lake s3://bucket/lake --model pyramid --shards 's3://bucket/raw/{000000..000099}.tar'
"""
from rayclust.cli import AUTO_CLUSTERS, JobArgumentParser, at_least, cluster_count
from rayclust.models import available_models


def build_parser() -> JobArgumentParser:
    parser = JobArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lake", required=True, help="lake root: a local folder or an s3:// prefix")
    parser.add_argument("--model", default="ccmlp", choices=available_models(), help="model (default: %(default)s)")
    parser.add_argument("--clusters", type=cluster_count, default=10, metavar="K|auto|A:B",
                        help="number of clusters K, or chosen without labels from A..B (auto: "
                             f"{AUTO_CLUSTERS.first}..{AUTO_CLUSTERS.last}) by the silhouette of k-means on up to "
                             "20,000 rows of the feature table, the smallest K within one standard error of the best; "
                             "see docs/models.md (default: %(default)s)")
    parser.add_argument("--epochs", type=at_least(1), default=None,
                        help="contrastive (TEMI: PMI) training epochs (default: the model config's, raised on a small "
                             "table to its minimum steps, see docs/models.md)")
    parser.add_argument("--self-label-epochs", type=at_least(0), default=None,
                        help="feature models: self-labelling epochs after the contrastive ones, 0 for none "
                             "(default: the model config's)")
    parser.add_argument("--batch-size", type=at_least(1), default=None,
                        help="samples per worker per step; the loss sees workers x this (default: the model config's, "
                             "lowered to fit a small feature table)")
    parser.add_argument("--workers", type=at_least(1), default=None,
                        help="Ray Train workers (default: one per GPU, else 1 using all CPUs but one)")
    parser.add_argument("--run", default=None,
                        help="run name under LAKE/models/; an unfinished run of that name resumes "
                             "(default: MODEL-TIMESTAMP)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--shards", default=None,
                        help="image models (pyramid) only: WebDataset shards to train on, brace ranges and globs; "
                             "jobs/infer.py labels these shards (default: none: feature models train on the lake's "
                             "features)")
    parser.add_argument("--init", default=None, metavar="PATH",
                        help="start from a local checkpoint (.safetensors, or a .pt/.pth state dict of tensors): "
                             "tensors whose names and shapes match the model's are loaded (default: none: random "
                             "initial weights)")
    return parser


def main() -> None:
    args = build_parser().parse_args()

    from rayclust.training import TrainSettings, train

    train(TrainSettings(args.lake, args.model, args.clusters, epochs=args.epochs, batch_size=args.batch_size,
                        workers=args.workers, run=args.run, seed=args.seed, shards=args.shards, init=args.init,
                        self_label_epochs=args.self_label_epochs))

