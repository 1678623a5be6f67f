"""Embedding ensemble-async in your own tool: an Ensemble over remote servers, streaming
results as items finish.

Runs anywhere as it is: without arguments it starts the project's TGI and vLLM-style test
doubles on loopback and points the ensemble at them.  Give real servers instead with
``--tgi http://gpu1:8080`` and/or ``--openai http://gpu2:8000`` (optionally ``--model``).

    python examples/embed_ensemble.py
    python examples/embed_ensemble.py --tgi http://gpu1:8080 --openai http://gpu2:8000
"""

from __future__ import annotations

import argparse
import asyncio
import json
from contextlib import AsyncExitStack

from ensemble_async import GenerationRequest
from ensemble_async.backends.openai import OpenAIBackend
from ensemble_async.backends.tgi import TGIBackend
from ensemble_async.ensemble import Ensemble
from ensemble_async.member import Member
from ensemble_async.retry import RetryPolicy
from ensemble_async.testing.openai_double import OpenAIDouble
from ensemble_async.testing.tgi_double import TGIDouble

QUESTIONS = [
    "What is the boiling point of water at sea level in Celsius?",
    "Name the largest planet in the solar system.",
    "How many legs does a spider have?",
    "What colour do you get by mixing blue and yellow?",
]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tgi", help="base URL of a TGI server")
    parser.add_argument("--openai", help="base URL of an OpenAI-compatible server (vLLM, ...)")
    parser.add_argument("--model", help="model id for the OpenAI-compatible server")
    args = parser.parse_args()

    async with AsyncExitStack() as stack:
        tgi_url, openai_url = args.tgi, args.openai
        if tgi_url is None and openai_url is None:  # demo mode: local doubles
            tgi_url = (await stack.enter_async_context(TGIDouble())).url
            openai_url = (await stack.enter_async_context(OpenAIDouble())).url
        members = []
        if tgi_url:
            members.append(Member(TGIBackend(tgi_url, name="tgi"), concurrency=16))
        if openai_url:
            vllm = OpenAIBackend(openai_url, model=args.model, name="vllm")
            members.append(Member(vllm, concurrency=32, retry=RetryPolicy(max_attempts=4)))
        requests = (GenerationRequest(prompt=q, max_new_tokens=32) for q in QUESTIONS)
        async with Ensemble(members, policy="exact", max_items_in_flight=8) as ensemble:
            async for result in ensemble.map(requests):
                print(json.dumps({"question": QUESTIONS[result.index], **result.to_dict()}))
            print(json.dumps({"stats": ensemble.stats()}))


if __name__ == "__main__":
    asyncio.run(main())
