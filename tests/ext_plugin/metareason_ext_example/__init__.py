"""A small third-party metareason plugin, as a user would write one.

It contributes a config section, a task, a reward, a special token, a prompt transform and a
CLI subcommand, so the test suite can check each path from outside the kernel's own package.
"""
from pydantic import BaseModel, ConfigDict

from metareason.api import hookimpl


class ExtExampleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prefix: str = ""
    add_token: bool = False


@hookimpl
def metareason_config_sections():
    return {"ext_example": ExtExampleConfig}


def _echo_task(params, seed, num_samples):
    from metareason.api import ListTask, TaskError

    word = params.get("word", "echo")
    if not isinstance(word, str):
        raise TaskError("params.word: must be a string")
    examples = [
        {"id": f"ext_echo/{i}", "prompt": f"{word} {i}=", "completion": str(i), "answer": str(i), "group": "all"}
        for i in range(num_samples)
    ]
    return ListTask("ext_echo", examples, scorer=lambda c, e: float(c.strip() == e["answer"]))


@hookimpl
def metareason_register_tasks(register):
    register("ext_echo", _echo_task)


@hookimpl
def metareason_register_rewards(register):
    register("ext_length", lambda completions, examples: [float(len(c)) for c in completions])


@hookimpl
def metareason_special_tokens(config):
    if config.ext_example.add_token:
        return ["<ext>"]
    return None


@hookimpl
def metareason_transform_prompt(prompt, config):
    return config.ext_example.prefix + prompt if config.ext_example.prefix else None


def _hello(args):
    print(f"hello from ext_example, {args.who}")
    return 0


@hookimpl
def metareason_cli_commands(subparsers):
    p = subparsers.add_parser("ext-example", help="the test plugin's own command")
    p.add_argument("who", nargs="?", default="world")
    p.set_defaults(func=_hello)
