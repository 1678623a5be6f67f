"""How often target-fit selection keeps a different answer than consensus, on a real run
of the embedded models (SmolLM2-135M-Instruct as the target model).

Runs the embedded default's pipeline three times with one response cache, so the three
runs see exactly the same generations and differ only in the selection policy:
``consensus`` (the baseline), ``target-fit`` and ``consensus+target-fit``.  Prints, for
the items each run decided: how many each policy kept, how often target-fit's winner
differs from the consensus winner, and a few examples.

    python bench/selection.py                  # 6 + 4 instructions (a few minutes on 2 cores)
    python bench/selection.py --io 10 --o 6
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from ensemble_async import cli
from ensemble_async.assemble import embedded_config, load_seeds
from ensemble_async.config import Targets
from ensemble_async.models import SMOLLM2
from ensemble_async.selection import SelectionConfig

POLICIES = ("consensus", "target-fit", "consensus+target-fit")


def read(path: Path) -> dict[str, dict[str, Any]]:
    if not path.exists():
        return {}
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--io", type=int, default=6, help="input-output instructions to keep")
    parser.add_argument("--o", type=int, default=4, help="output-only instructions to keep")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="selection-bench-"))
    base = embedded_config()
    base = dataclasses.replace(
        base,
        run=dataclasses.replace(
            base.run,
            targets=Targets(input_output=args.io, output=args.o),
            cache_path=work / "shared-cache.sqlite",
        ),
    )
    seeds = load_seeds(base)
    outputs: dict[str, Path] = {}
    for policy in POLICIES:
        selection = (
            SelectionConfig()
            if policy == "consensus"
            else SelectionConfig(policy=policy, target=SMOLLM2.key)  # type: ignore[arg-type]
        )
        config = dataclasses.replace(base, selection=selection).with_output(
            work / policy / "records.jsonl"
        )
        started = time.perf_counter()
        code = asyncio.run(cli.generate(config, seeds, console=Console(stderr=True, quiet=True)))
        print(f"{policy}: exit {code} in {time.perf_counter() - started:.0f} s")
        outputs[policy] = config.run.output

    kept = {policy: read(path) for policy, path in outputs.items()}
    rejected = {
        policy: read(path.with_name("records.rejects.jsonl")) for policy, path in outputs.items()
    }
    decided = {p: {**kept[p], **rejected[p]} for p in POLICIES}
    print(f"\nitems decided at step 5 (consensus run): {len(decided['consensus'])}")
    for policy in POLICIES:
        print(f"{policy:>22}: kept {len(kept[policy])}")
    examples = []
    for policy in ("target-fit", "consensus+target-fit"):
        both = set(kept["consensus"]) & set(kept[policy])
        differ = [
            i for i in sorted(both) if kept["consensus"][i]["output"] != kept[policy][i]["output"]
        ]
        extra = set(kept[policy]) - set(kept["consensus"])
        print(
            f"{policy}: of {len(both)} items both kept, {len(differ)} "
            f"({100 * len(differ) / max(1, len(both)):.0f}%) keep a different answer; "
            f"{len(extra)} kept that consensus dropped"
        )
        for i in differ[:2]:
            examples.append((policy, kept["consensus"][i], kept[policy][i]))
    for policy, a, b in examples:
        why = b["provenance"]["decision"]["selection"]["why"]
        print(f"\n[{policy}] {a['instruction'][:100]!r}")
        print(f"  consensus: {a['output'][:120]!r}")
        print(f"  {policy}: {b['output'][:120]!r}")
        print(f"  why: {why}")
    print(f"\nfiles in {work}")


if __name__ == "__main__":
    main()
