"""Built-in backend adapters, installed as ``ensemble_async.backends``.

Each module holds one adapter implementing ``ensemble_async.Backend``:

- ``openai``: any OpenAI-compatible server (vLLM, TGI's /v1, llama.cpp, Ollama, OpenAI)
- ``tgi``: text-generation-inference: its native API for prompts, its /v1 chat route for messages
- ``transformers``: a local model, micro-batched in one worker thread

Import the module you need; nothing heavy is imported here.
"""
