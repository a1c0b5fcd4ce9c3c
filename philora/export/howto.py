"""How to load what philora made, as a model card says it: with philora, with peft and transformers, with
llama.cpp and with Ollama, for an adapter (on its base) or a merged model; from the local dir, or from the Hub repo
the card is pushed to."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from philora.export.card import Base

EMBEDDED_DIR = 'python -c "from philora.model.embedded import embedded_model_dir as d; print(d())"'


def usage_section(kind: str, base: Base, path: Path, repo: str | None, name: str) -> str:
    """How to load the adapter (`kind` "adapter") or merged model at `path`: from `repo` when the card goes to the
    Hub (fetched into a dir called `name` for the commands that need files), else from `path`."""
    where = json.dumps(repo or str(path))
    local = name if repo else str(path)
    fetch = [f"hf download {repo} --local-dir {local}"] if repo else []
    if kind == "adapter":
        return adapter_usage(base, where, local, fetch, name)
    return merged_usage(where, local, fetch)


def adapter_usage(base: Base, where: str, local: str, fetch: list[str], name: str) -> str:
    base_dir, get_base = base_dir_commands(base)
    philora = _lines(*fetch, f"philora chat --adapter {local}", f"philora serve --adapter {name}={local}")
    llama_cpp = _lines(
        *get_base,
        f"philora export gguf --model {base_dir} --output base.gguf",
        f"philora export gguf-lora --adapter {local} --output adapter.gguf",
        "llama-cli -m base.gguf --lora adapter.gguf",
    )
    ollama = _lines(
        f"philora export ollama --model {base_dir} --output ollama/",
        'echo "ADAPTER $PWD/adapter.gguf" >> ollama/Modelfile',
        "ollama create NAME -f ollama/Modelfile",
    )
    return f"""## How to use

With philora (chat in the terminal, or an OpenAI-compatible server), which finds the base itself:

```sh
{philora}
```

With peft and transformers:

```python
{python_load(base, where)}
```

With llama.cpp, the base and the adapter as GGUF files, the adapter applied at load time:

```sh
{llama_cpp}
```

With Ollama, the base's GGUF and a Modelfile with its chat template, plus the adapter's GGUF from above:

```sh
{ollama}
```"""


def merged_usage(where: str, local: str, fetch: list[str]) -> str:
    philora = _lines(*fetch, f"philora chat --model {local}", f"philora serve --model {local}")
    gguf = _lines(
        f"philora export gguf --model {local} --output model.gguf --type q4_k_m",
        "llama-cli -m model.gguf",
        f"philora export ollama --model {local} --output ollama/",
        "cd ollama && ollama create NAME -f Modelfile",
    )
    return f"""## How to use

With philora (chat in the terminal, or an OpenAI-compatible server):

```sh
{philora}
```

With transformers:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained({where})
tokenizer = AutoTokenizer.from_pretrained({where})
{GENERATE}
```

With llama.cpp or Ollama, exported to GGUF first:

```sh
{gguf}
```"""


GENERATE = """
messages = [{"role": "user", "content": "Hello!"}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
output = model.generate(**inputs, max_new_tokens=64)
print(tokenizer.decode(output[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True))"""


def python_load(base: Base, where: str) -> str:
    """peft + transformers code that loads the adapter on its base and answers one message."""
    if base.source is None:
        imports = "from philora.model.embedded import embedded_model_dir\n"
        source = "embedded_model_dir()"
    else:
        imports, source = "", json.dumps(base.source)
    revision = f", revision={json.dumps(base.revision)}" if base.revision else ""
    return f"""{imports}from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained({source}{revision})
model = PeftModel.from_pretrained(base, {where})
tokenizer = AutoTokenizer.from_pretrained({where})
{GENERATE}"""


def base_dir_commands(base: Base) -> tuple[str, list[str]]:
    """The shell word for the base model's local dir, and the commands that fetch it first if needed."""
    if base.source is None:
        return '"$BASE"', [f"BASE=$({EMBEDDED_DIR})"]
    if base.hub_id is None:
        return base.source, []
    revision = f" --revision {base.revision}" if base.revision else ""
    return "base", [f"hf download {base.hub_id}{revision} --local-dir base"]


def _lines(*commands: str) -> str:
    return "\n".join(commands)
