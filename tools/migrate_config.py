"""Write an upstream MindFormers YAML (tags v1.3.2 - v1.5.0) translated to what runs here.

    python tools/migrate_config.py research_upstream/finetune_wizardcoder_15b_bf16.yaml my_finetune.yaml

run_mindformer.py applies the same translation on the fly (one warning per substitution); this writes it
once, so the YAML no longer needs it. See mindformers_ext/upstream.py for the substitutions. Comments of
the original are not kept; a header lists what changed.
"""
import argparse
import os
import sys

try:
    from mindformers_ext.upstream import migrate_file
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from mindformers_ext.upstream import migrate_file


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("old", help="the upstream YAML")
    parser.add_argument("new", help="where to write the migrated YAML")
    args = parser.parse_args(argv)
    if os.path.abspath(args.old) == os.path.abspath(args.new):
        print("error: write the migrated YAML to another file (the original keeps its comments)", file=sys.stderr)
        return 2
    try:
        changes = migrate_file(args.old, args.new, warn=lambda m: print(f"changed {m}"))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.new} ({len(changes)} change{'s' if len(changes) != 1 else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
