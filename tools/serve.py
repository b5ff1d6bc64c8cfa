"""Serve a model behind an OpenAI-compatible HTTP API (continuous batching over a paged KV cache).

    python tools/serve.py                       # the embedded demo model on 127.0.0.1:8000, offline
    python tools/serve.py --config research/deepseek1_5/predict_deepseek_coder1_5_7b.yaml \
        --load_checkpoint ds7b.ckpt --host 0.0.0.0 --port 8000
    python tools/serve.py --model HF_DIR        # an HF checkpoint directory (config.json + weights)

Then, e.g. with the official client:
    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.completions.create(model="deepseek_coder_demo", prompt="def fib(n):", max_tokens=32)

Scheduler flags follow vLLM's (--block_size, --num_blocks, --max_num_seqs,
--max_num_batched_tokens); --max_queue bounds the waiting requests (503 beyond).
"""
import argparse
import os
import sys

DEFAULT_CONFIG = "configs/deepseek1_5/predict_demo.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", default=None, help=f"predict YAML (default: the demo, {DEFAULT_CONFIG})")
    src.add_argument("--model", default=None, metavar="HF_DIR", help="an HF checkpoint directory instead of a YAML")
    p.add_argument("--load_checkpoint", default=None, help="weights for --config (default: the YAML's)")
    p.add_argument("--random_weights", action="store_true", help="serve random weights when no checkpoint is named")
    p.add_argument("--served_model_name", default=None,
                   help="the model name clients send (default: the YAML's trainer.model_name or HF_DIR's name)")
    p.add_argument("--quant", choices=("w8a16",), default=None,
                   help="int8 weights (an int8 checkpoint of convert_weight.py --quant loads as stored)")
    p.add_argument("--kv_cache_dtype", choices=("int8",), default=None,
                   help="int8 KV cache (per token and head scales); default: the YAML's")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--block_size", type=int, default=16, help="tokens per KV-cache block")
    p.add_argument("--num_blocks", type=int, default=None,
                   help="KV-cache blocks (default: max_num_seqs sequences of the full context)")
    p.add_argument("--max_num_seqs", type=int, default=16, help="most requests decoding at once")
    p.add_argument("--max_num_batched_tokens", type=int, default=2048, help="token budget of one step")
    p.add_argument("--max_queue", type=int, default=256, help="most waiting requests; 503 beyond")
    p.add_argument("--dynamic_decode", action="store_true",
                   help="one dynamic-shape decode graph instead of static graphs for bucketed batch shapes "
                        "(starts faster: nothing to compile ahead; each decode step takes about 1.6x as long)")
    p.add_argument("--dynamic_prefill", action="store_true",
                   help="every prefill runs one dynamic-shape graph, instead of static graphs for prompts of up to 64 "
                        "tokens padded to bucketed shapes (starts faster; a short prompt's first token takes about "
                        "twice as long)")
    p.add_argument("--compile_cache", default=None, metavar="DIR",
                   help="keep the compiled graphs under DIR (MindSpore's compile cache) and reuse them on the next "
                        "start with the same model configuration, settings and code: the demo's warm-up takes "
                        "about 2 s instead of 27")
    p.add_argument("--log_level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    args = p.parse_args(argv)
    if args.load_checkpoint and args.model:
        p.error("--load_checkpoint goes with --config; --model HF_DIR loads the directory's own weights")
    return args


def load(args: argparse.Namespace):
    """(model, tokenizer, served name, family) for the command line."""
    # pylint: disable=import-outside-toplevel
    from mindformers_ext.serving.loading import load_config_model, load_hf_dir

    if args.model:
        return load_hf_dir(args.model, args.served_model_name, args.quant, args.kv_cache_dtype)
    return load_config_model(args.config or DEFAULT_CONFIG, args.load_checkpoint, args.random_weights,
                             args.served_model_name, args.quant, args.kv_cache_dtype)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.config and not args.model and not os.path.isfile(DEFAULT_CONFIG):
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the demo's paths are repo-relative
    import uvicorn  # pylint: disable=import-outside-toplevel

    from mindformers_ext.serving.loading import serve_app  # pylint: disable=import-outside-toplevel

    model, tokenizer, name, family = load(args)
    engine = dict(block_size=args.block_size, num_blocks=args.num_blocks, max_num_seqs=args.max_num_seqs,
                  max_num_batched_tokens=args.max_num_batched_tokens, max_queue=args.max_queue,
                  decode_buckets=not args.dynamic_decode, prefill_buckets=not args.dynamic_prefill)
    if args.compile_cache:
        from mindformers_ext.serving.loading import compile_cache_path  # pylint: disable=import-outside-toplevel

        path = compile_cache_path(args.compile_cache, model, quant=args.quant, **engine)
        os.environ["MS_COMPILER_CACHE_ENABLE"], os.environ["MS_COMPILER_CACHE_PATH"] = "1", path
        print(f"compile cache: {path}", flush=True)
    app = serve_app(model, tokenizer, name, family, **engine)
    print(f"serving {name!r} ({family}) on http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
