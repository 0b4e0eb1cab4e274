"""Write a small random-initialised Llama and the project's own BPE tokenizer (no download)."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from safedata.models import make_tiny_model  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output_dir", required=True, help="folder for config, weights and tokenizer (created)")
    parser.add_argument("--hidden_size", type=int, default=64, help="model width (default: 64)")
    parser.add_argument("--num_layers", type=int, default=2, help="decoder layers (default: 2)")
    parser.add_argument("--num_heads", type=int, default=4, help="attention heads; must divide --hidden_size (default: 4)")
    parser.add_argument("--vocab_size", type=int, default=2048, help="BPE vocabulary size")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default: 0)")
    parser.add_argument("--tie_word_embeddings", action="store_true",
                        help="share the input embedding and the LM head (as some models do; default: separate)")
    parser.add_argument("--corpus", nargs="*", default=None,
                        help="text/json files to train the tokenizer on (default: the project's own data)")
    args = parser.parse_args()
    out = make_tiny_model(args.output_dir, args.hidden_size, args.num_layers, args.num_heads, args.vocab_size,
                          args.seed, args.corpus, args.tie_word_embeddings)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
