"""Input pipeline: digits / npz / image-folder / TFDS ArrayRecord sources -> grain batches."""
from data.pipeline import build_train_dataset
from data.pipeline import load_eval_split
from data.sources import check_source
from data.sources import DataError
