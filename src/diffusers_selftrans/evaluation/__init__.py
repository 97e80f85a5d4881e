# Copyright 2026 The diffusers-selftrans authors. Apache-2.0.
"""Evaluation: `sampling` (class-balanced seeded samples, their uint8 image format, ADM `.npz`), `metrics` (FID, sFID,
IS, precision/recall; Inception) and `classifier` (feature-FID and class accuracy for small data)."""

from .classifier import (FeatureClassifier, class_accuracy, evaluate_samples, load_feature_classifier,
                         save_feature_classifier, train_feature_classifier)
from .metrics import (INCEPTION_SCORE_SPLITS, INCEPTION_WEIGHTS_FILENAME, INCEPTION_WEIGHTS_URL, PRECISION_RECALL_K,
                      SPATIAL_FEATURE_CHANNELS, InceptionFeatureExtractor, compute_fid, compute_inception_metrics,
                      extract_features, frechet_distance, inception_score, precision_recall, resolve_inception_weights)
from .sampling import (NPZ_IMAGES_KEY, NPZ_LABELS_KEY, PIXEL_CONVERSION, SAMPLING_INFO_NAME, ImagesLike, SamplePlan,
                       class_balanced_plan, count_nfe, create_npz_from_sample_folder, generate_samples, load_images,
                       partition_plan, sample_path, sample_seed, sampling_info, to_uint8_nchw, to_uint8_nhwc,
                       write_sampling_info)
