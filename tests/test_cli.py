"""The command line: the ask command against doubles, usage errors and exit codes."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from ensemble_async import cli
from ensemble_async.testing.faults import Fault
from ensemble_async.testing.openai_double import OpenAIDouble
from ensemble_async.testing.tgi_double import TGIDouble


async def test_ask_prints_every_candidate_and_the_consensus() -> None:
    async with TGIDouble() as tgi, OpenAIDouble() as oai:
        args = cli.build_parser().parse_args(
            [
                "ask",
                "Name a colour.",
                "--no-chat",
                "--member",
                f"tgi={tgi.url},name=gpu-tgi",
                "--member",
                f"openai={oai.url},model=double-model,name=gpu-vllm",
                "--max-new-tokens",
                "8",
            ]
        )
        out = io.StringIO()
        code = await cli._run_ask(args, Console(file=out, width=200))
    text = out.getvalue()
    assert code == cli.EXIT_OK
    assert "gpu-tgi" in text and "gpu-vllm" in text
    assert "consensus:" in text
    assert tgi.stats.requests >= 1 and oai.requests == 1


async def test_ask_reports_failed_members_and_exit_3_when_all_fail() -> None:
    async with TGIDouble() as tgi:
        tgi.faults.push(Fault.status(500), Fault.status(500))
        args = cli.build_parser().parse_args(
            ["ask", "x", "--no-chat", "--attempts", "1", "--member", f"tgi={tgi.url}"]
        )
        out = io.StringIO()
        code = await cli._run_ask(args, Console(file=out, width=200))
    assert code == cli.EXIT_BACKENDS_FAILED
    assert "ServerError" in out.getvalue()


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["ask", "x", "--member", "nosuchkind=http://h"], "unknown backend kind 'nosuchkind'"),
        (["ask", "x", "--member", "tgi"], "expected KIND=URL_OR_MODEL"),
        (["ask", "x", "--member", "tgi=http://h,oops"], "is not key=value"),
        (["ask", "x", "--member", "tgi=http://h,bogus=1"], "bad option"),
        (["ask", "x", "--member", "tgi=http://h", "--max-new-tokens", "0"], "max_new_tokens"),
        (
            ["ask", "x", "--member", "openai=http://h,api_key_env=EA_CLI_TEST_MISSING_KEY"],
            "EA_CLI_TEST_MISSING_KEY",
        ),
    ],
)
def test_usage_errors_exit_2_with_a_clear_message(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "error:" in err and needle in " ".join(err.split())


def test_unreachable_member_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(
        ["ask", "x", "--no-chat", "--attempts", "1", "--member", "tgi=http://127.0.0.1:9"]
    )
    assert code == cli.EXIT_BACKENDS_FAILED
    assert "ConnectError" in capsys.readouterr().out


def test_backends_lists_the_builtin_kinds(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["backends"]) == cli.EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert {"openai", "tgi", "transformers", "vllm (alias of openai)"} <= set(lines)
    assert lines == sorted(lines)
