"""Training and inference throughput of the keras.io CCT example itself, for comparison with cct.

The model and its compile step (AdamW 1e-3 / 1e-4, label-smoothed cross-entropy, two metrics)
come from tests/fixtures/make_keras_fixture.py, which mirrors the example
(https://keras.io/examples/vision/cct/); nothing is redefined here. Data are random uint8
CIFAR-shaped images, fed to `model.fit` as the example feeds CIFAR-10 (uint8, one-hot labels).

Throughput is the median over timed windows of consecutive batches, after warm-up batches that
absorb tracing and compilation. Runs in the Keras venv (benchmarks/setup_keras_env.sh):

    /tmp/kerasenv/bin/python benchmarks/keras_reference.py --json
    KERAS_BACKEND=jax /tmp/kerasenv/bin/python benchmarks/keras_reference.py   # if jax is installed
"""
import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

try:
    import keras  # noqa: E402
except ImportError:  # this script runs in the Keras venv, not cct's
    sys.exit("keras_reference.py needs Keras 3 and TensorFlow: build their venv with benchmarks/setup_keras_env.sh "
             "and run this script with that venv's python")
import numpy as np  # noqa: E402

FIXTURE_SCRIPT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "make_keras_fixture.py"


def load_example():
    spec = importlib.util.spec_from_file_location("make_keras_fixture", FIXTURE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BatchClock(keras.callbacks.Callback):
    """Wall-clock time at the end of every train / predict batch."""

    def __init__(self):
        super().__init__()
        self.train_times, self.predict_times = [], []

    def on_train_batch_end(self, batch, logs=None):
        self.train_times.append(time.perf_counter())

    def on_predict_batch_end(self, batch, logs=None):
        self.predict_times.append(time.perf_counter())


def windowed_rate(times: list[float], warmup: int, window: int, batch_size: int) -> tuple[float, list[float]]:
    """Median images/s over consecutive windows of `window` batches, the first `warmup` skipped."""
    stamps = times[warmup - 1:] if warmup > 0 else times
    rates = [window * batch_size / (stamps[i + window] - stamps[i])
             for i in range(0, len(stamps) - window, window)]
    return statistics.median(rates), rates


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=128, help="training batch (the example's 128)")
    parser.add_argument("--infer-batch-size", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches first")
    parser.add_argument("--window", type=int, default=10, help="batches per timed window")
    parser.add_argument("--windows", type=int, default=5, help="timed windows; the median is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = parser.parse_args(argv)

    load_before = os.getloadavg()[0]  # other work on the machine skews every number below
    example = load_example()
    keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = example.compile_like_example(example.create_cct_model())
    clock = BatchClock()

    train_batches = args.warmup + args.window * args.windows
    x = rng.integers(0, 256, (train_batches * args.batch_size, 32, 32, 3), dtype=np.uint8)
    y = keras.utils.to_categorical(rng.integers(0, example.num_classes, len(x)), example.num_classes)
    model.fit(x, y, batch_size=args.batch_size, epochs=1, shuffle=False, verbose=0, callbacks=[clock])
    train_rate, train_rates = windowed_rate(clock.train_times, args.warmup, args.window, args.batch_size)

    infer_batches = args.warmup + args.window * args.windows
    x = rng.integers(0, 256, (infer_batches * args.infer_batch_size, 32, 32, 3), dtype=np.uint8)
    model.predict(x, batch_size=args.infer_batch_size, verbose=0, callbacks=[clock])
    infer_rate, infer_rates = windowed_rate(clock.predict_times, args.warmup, args.window, args.infer_batch_size)

    backend = keras.backend.backend()
    result = {
        "train_images_per_second": round(train_rate, 1),
        "infer_images_per_second": round(infer_rate, 1),
        "backend": backend,
        "keras": keras.__version__,
        "tensorflow": None,
        "train_batch_size": args.batch_size,
        "infer_batch_size": args.infer_batch_size,
        "train_window_rates": [round(r, 1) for r in train_rates],
        "infer_window_rates": [round(r, 1) for r in infer_rates],
        "cpu_count": os.cpu_count(),
        "load_average_before": round(load_before, 2),
    }
    if backend == "tensorflow" or "tensorflow" in sys.modules:
        import tensorflow as tf
        result["tensorflow"] = tf.__version__
    if args.json:
        print(json.dumps(result))
    else:
        print(f"Keras {result['keras']} ({backend} backend, TensorFlow {result['tensorflow']}), "
              f"{result['cpu_count']} CPUs, load average {load_before:.2f} before the run")
        print(f"train  batch {args.batch_size}: {train_rate:8.1f} images/s  (windows: {result['train_window_rates']})")
        print(f"infer  batch {args.infer_batch_size}: {infer_rate:8.1f} images/s  (windows: {result['infer_window_rates']})")
    return result


if __name__ == "__main__":
    main()
