"""How to load what philora made: as a model card says it (with philora, with peft and transformers, with
llama.cpp and with Ollama, for an adapter on its base or a merged model; from the local dir, or from the Hub repo
the card is pushed to), and as `philora merge` and `philora export` say it once the files are written, with their
real paths."""

from __future__ import annotations

import json
import re
import shlex
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
        f"philora export gguf --base {base_dir} --output base.gguf",
        f"philora export gguf-lora --adapter {local} --output adapter.gguf",
        "llama-cli -m base.gguf --lora adapter.gguf",
    )
    ollama = _lines(
        f"philora export ollama --base {base_dir} --output ollama/",
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
    philora = _lines(*fetch, f"philora chat --base {local}", f"philora serve --base {local}")
    gguf = _lines(
        f"philora export gguf --merged {local} --output model.gguf --type q4_k_m",
        "llama-cli -m model.gguf",
        f"philora export ollama --merged {local} --output ollama/",
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


# --- what merge and export print once their files are written -----------------------------------------------------

HELLO = '[{"role": "user", "content": "Hello!"}]'


def after_merge(folder: Path) -> str:
    """How to use a merged model dir: philora, transformers, and the way to llama.cpp and Ollama."""
    where = _q(folder)
    code = (
        f'from transformers import pipeline; chat = pipeline("text-generation", {json.dumps(str(folder))}); '
        f'print(chat({HELLO}, max_new_tokens=64)[0]["generated_text"][-1]["content"])'
    )
    return _usage(
        folder,
        (f"philora chat --base {where}", "chat in the terminal"),
        (f"philora serve --base {where}", "an OpenAI-compatible server"),
        (f"python -c {shlex.quote(code)}", "transformers"),
        (f"philora export gguf --merged {where} --output model.gguf --type q4_k_m", "for llama.cpp"),
        (f"philora export ollama --merged {where} --output ollama", "for Ollama"),
    )


def after_gguf(path: Path) -> str:
    """How to use a GGUF file: llama.cpp's chat and server, llama-cpp-python, and the way to Ollama."""
    where = _q(path)
    return _usage(
        path,
        (f"llama-cli -m {where} -cnv", "chat in the terminal (llama.cpp)"),
        (f"llama-server -m {where} --port 8080", "an OpenAI-compatible server"),
        (f"python -c {shlex.quote(_llama_cpp_python(path))}", "llama-cpp-python"),
        (f"echo {shlex.quote(f'FROM {path.resolve()}')} > Modelfile && ollama create NAME -f Modelfile",
         "Ollama; `philora export ollama` writes a Modelfile with the chat template and stops"),
    )  # fmt: skip


def after_ollama(folder: Path) -> str:
    """How to use an `export ollama` dir: create the model from its Modelfile, run it, or use its GGUF directly."""
    name = re.sub(r"[^a-z0-9._-]+", "-", folder.resolve().name.lower()).strip("-.") or "NAME"
    return _usage(
        folder,
        (f"cd {_q(folder)} && ollama create {name} -f Modelfile", "once"),
        (f"ollama run {name}", "chat in the terminal; Ollama's API serves it too"),
        (f"llama-cli -m {_q(folder / 'model.gguf')} -cnv", "the same GGUF in llama.cpp"),
    )


def after_lora(path: Path, base_gguf: Path | None, base_dir: str) -> str:
    """How to use a GGUF LoRA: on its base GGUF (`base_gguf`, else one exported from the base model `base_dir`, a
    local dir or a hub id) in llama.cpp, llama-cpp-python and Ollama."""
    base = base_gguf if base_gguf is not None else Path("base.gguf")
    export = "philora export gguf --base {} --output base.gguf"
    if Path(base_dir).is_dir():
        export = export.format(shlex.quote(base_dir))
    else:  # a hub id: export reads a local dir
        export = f"hf download {shlex.quote(base_dir)} --local-dir base && {export.format('base')}"
    first = [(export, "the base as GGUF, once")] if base_gguf is None else []
    where, on = _q(path), _q(base)
    return _usage(
        path,
        *first,
        (f"llama-cli -m {on} --lora {where} -cnv", "chat in the terminal (llama.cpp)"),
        (f"llama-server -m {on} --lora {where} --port 8080", "an OpenAI-compatible server"),
        (f"python -c {shlex.quote(_llama_cpp_python(base, path))}", "llama-cpp-python"),
        (f"ADAPTER {path.resolve()}", "in an Ollama Modelfile, after FROM the base (philora export ollama --base)"),
    )


def _llama_cpp_python(model: Path, lora: Path | None = None) -> str:
    adapter = f", lora_path={json.dumps(str(lora))}" if lora is not None else ""
    return (
        f"from llama_cpp import Llama; llm = Llama({json.dumps(str(model))}{adapter}, n_ctx=2048, verbose=False); "
        f'print(llm.create_chat_completion({HELLO})["choices"][0]["message"]["content"])'
    )


def _usage(path: Path, *commands: tuple[str, str]) -> str:
    """`philora: to use PATH:` and one command a line, each with what it is for as a shell comment."""
    return "\n".join([f"philora: to use {path}:", *(f"  {command}  # {what}" for command, what in commands)])


def _q(path: Path) -> str:
    return shlex.quote(str(path))
