"""Training data for the example scripts: images through `datasets`, or pre-encoded VAE latent shards.

* `config.py`   `DataConfig`: the data settings the library takes (`cli.add_data_args`: the same settings as flags).
* `images.py`   decoding, RGB conversion, ADM center crop, pixels in [-1, 1] (REPA/ADM, method notes §2.1).
* `sources.py`  `ImageSource`: every image dataset through one `datasets.load_dataset` path, columns, classes, labels,
                captions.
* `latents.py`  the latent shards of `examples/preprocess_latents.py`: naming, writing, `LatentSource`, VAE checks.
* `stream.py`   `TrainDataStream`: per-process batches forever with an exact, resumable data position.
"""

from .config import MIN_SAMPLES_FOR_SKIP_CHECK, DataConfig, default_num_workers
from .images import CROP_RECIPE, adm_center_crop, image_to_tensor, open_image, preprocess_image, to_rgb
from .latents import (LATENT_FORMAT_VERSION, LATENT_SHARD_RE, LATENT_STATS_FILE, LatentSource, check_latent_stats,
                      latent_shard_name, list_latent_shards, read_latent_shard_metadata, save_latent_shard)
from .sources import CaptionError, ImageSource, LabelError, parquet_num_rows, streamed_num_examples
from .stream import SkipCounter, TrainDataStream, ordered_map
