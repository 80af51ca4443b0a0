"""The `nmt` command: each subcommand parses its options, hands them to the library and prints what it returns."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from nmt.corpora import LOCAL_MULTI30K
from nmt.errors import NmtError, first_line

try:  # Typer 0.2x carries a copy of Click of its own and raises that copy's exceptions
    from typer._click import exceptions as click_errors
except ImportError:
    from click import exceptions as click_errors


class Terminated(KeyboardInterrupt):
    """SIGTERM (a supervisor's or `timeout`'s stop), raised where the command is, so that it stops
    as on Ctrl-C: temporary files removed, worker and server processes stopped."""


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM raises `Terminated` while the command runs (Python's default ends the process
    where it is, cleaning nothing up); yields a list that holds the signal once it came."""
    received: list[int] = []

    def interrupt(signum, frame):
        received.append(signum)
        raise Terminated

    if threading.current_thread() is not threading.main_thread():  # only the main thread sets handlers
        yield received
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


class OneLineUsageErrors(TyperGroup):
    """Usage errors (an unknown option, a missing argument, a value of the wrong kind) in one line
    on stderr and exit status 2, as other user errors are, not Click's usage box. SIGTERM stops a
    command as Ctrl-C does, with exit status 143 (training saves last/ first and exits 0)."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        terminated: list[int] = []
        try:
            with sigterm_as_interrupt() as terminated:
                code = self._main_with_one_line_errors(*args, **kwargs)
        except Terminated:  # between the command's end and the handler's return
            code = None
        except SystemExit as e:  # a one-line error
            code = e.code
        sys.exit(128 + signal.SIGTERM if terminated else code if isinstance(code, int) else 0)

    def _main_with_one_line_errors(self, *args, **kwargs):
        """The command's exit code (a command's typer.Exit(code) returns its code)."""
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except getattr(click_errors, "NoArgsIsHelpError", ()) as e:  # `nmt` alone: Typer has shown the help
            sys.exit(e.exit_code)
        except click_errors.UsageError as e:
            hint = f" (see {e.ctx.command_path} --help)" if e.ctx is not None else ""
            typer.echo(f"error: {e.format_message()}{hint}", err=True)
            sys.exit(e.exit_code)
        except click_errors.ClickException as e:
            typer.echo(f"error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except typer.Abort:
            typer.echo("Aborted!", err=True)
            sys.exit(1)


app = typer.Typer(
    cls=OneLineUsageErrors,
    name="nmt",
    help="Neural machine translation: prepare data, train, translate, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@contextlib.contextmanager
def user_errors():
    """Turn errors a user can fix into one line on stderr and exit status 1."""
    try:
        yield
    except NmtError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    except OSError as e:  # a full disk, a name too long: where no more particular message was given
        typer.echo(_os_error_line(e), err=True)
        raise typer.Exit(1) from None


def _os_error_line(e: OSError) -> str:
    names = " -> ".join(str(name) for name in (e.filename, e.filename2) if name)
    return f"error: {e.strerror or first_line(e)}" + (f": {names}" if names else "")


def _refuse_unused_options(ctx: typer.Context, name: str, used: set[str]) -> None:
    """A one-line error for an option given on the command line that `name` does not use."""
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name)  # typer's click enum: compared by name
        if param.name not in used and source is not None and source.name == "COMMANDLINE":
            raise NmtError(f"{'/'.join(param.opts + param.secondary_opts)} does not go with {name}")


@app.command()
def prepare(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", "-o", help="Data directory to create.")],
    src: Annotated[str | None, typer.Option(help="Source language code, e.g. de.")] = None,
    tgt: Annotated[str | None, typer.Option(help="Target language code, e.g. en.")] = None,
    mono: Annotated[list[Path] | None, typer.Option(help="Monolingual text for nmt pretrain instead of a parallel corpus: one sentence per line, a blank line between documents (.gz allowed; repeatable; the language is the file name's suffix, as in news.de).")] = None,
    mono_langs: Annotated[str | None, typer.Option(help="With --mono: the language of each file, e.g. de,en (instead of the file names' suffixes).")] = None,
    train: Annotated[list[str] | None, typer.Option(help="Training files prefix: PREFIX.SRC and PREFIX.TGT (.gz allowed); with --directions, one for all or one per direction.")] = None,
    valid: Annotated[list[str] | None, typer.Option(help="Validation files prefix (with --train); with --directions, one for all or one per direction (then per --zero-shot direction).")] = None,
    test: Annotated[list[str] | None, typer.Option(help="Test files prefix (with --train); with --directions, one for all or one per direction (then per --zero-shot direction).")] = None,
    tagged_train: Annotated[str | None, typer.Option(help="More training pairs, PREFIX.SRC and PREFIX.TGT (.gz allowed), each source after the reserved [CLS] symbol: back-translations tagged as synthetic, which the model learns to tell from real sources (Caswell et al., 2019). Never held out for valid/test.")] = None,
    tsv: Annotated[list[Path] | None, typer.Option(help="Tab-separated corpus (.gz allowed); with --directions, one for all of them or one per direction, in order (repeat the option).")] = None,
    tsv_langs: Annotated[list[str] | None, typer.Option(help="Language of each TSV column, e.g. en,es; with several --tsv, one per --tsv in order (without it, each TSV's columns are in its direction's order).")] = None,
    hf: Annotated[str | None, typer.Option(help="Hugging Face dataset id, or a local folder of json/csv/parquet files.")] = None,
    hf_config: Annotated[str | None, typer.Option(help="Dataset config, e.g. de-en.")] = None,
    hf_revision: Annotated[str | None, typer.Option(help="Dataset revision (branch, tag or commit).")] = None,
    corpus: Annotated[list[str] | None, typer.Option(help="A known public corpus: multi30k, iwslt2017-de-en, wmt14-de-en, wmt16-ro-en; with --directions, one for all or one per direction.")] = None,
    directions: Annotated[str | None, typer.Option(help="A multilingual data dir for one model: directions such as de-en,en-de,fr-en (files PREFIX.LANG); each source starts with its target language's tag, <2en>.")] = None,
    zero_shot: Annotated[str | None, typer.Option(help="With --directions: directions to hold valid/test sets for but not train on, e.g. de-fr (read from the --valid/--test prefixes).")] = None,
    lang_temperature: Annotated[float | None, typer.Option(help="With --directions: sampling temperature of languages (SentencePiece sample) and directions (training): shares ∝ size^(1/T); 1 keeps the natural proportions, more evens them out (default: 1.5).", show_default=False)] = None,
    data_dir: Annotated[Path | None, typer.Option(help="With --corpus: read it from this folder of local files instead of the Hub.")] = None,
    valid_size: Annotated[int, typer.Option(help="Pairs held out for validation when the input has no valid split.")] = 1000,
    test_size: Annotated[int, typer.Option(help="Pairs held out for testing when the input has no test split.")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the held-out split.")] = 1,
    split_by: Annotated[str | None, typer.Option(help="Hold out whole groups of pairs that share a sentence in this language (the source or target language), so that none of valid/test's sentences in it is in train.")] = None,
    normalize: Annotated[str, typer.Option(help="Unicode normalization: NFC, NFKC, NFD, NFKD, or none (which also turns off the folding of width, punctuation and script for Chinese).")] = "NFC",
    max_words: Annotated[int, typer.Option(help="Drop pairs with a side longer than this many words (characters for Chinese, Japanese, Korean).")] = 250,
    max_ratio: Annotated[float, typer.Option(help="Drop pairs whose longer side has more than this times the length of the other (words, or characters as above).")] = 3.0,
    dedup: Annotated[bool, typer.Option(help="Drop exact duplicate pairs.")] = True,
    vocab_size: Annotated[int, typer.Option(help="SentencePiece vocabulary size (a soft limit for small corpora).")] = 8000,
    spm_type: Annotated[str, typer.Option(help="SentencePiece model: unigram or bpe.")] = "unigram",
    joint_vocab: Annotated[bool, typer.Option("--joint-vocab/--separate-vocab", help="One vocabulary for both languages, or one each.")] = True,
    character_coverage: Annotated[float | None, typer.Option(help="SentencePiece character coverage (default: 0.9995 with byte fallback for Chinese, Japanese and Korean, else 1.0).")] = None,
    chinese_script: Annotated[str, typer.Option(help="Chinese sides: 'simplified' converts Traditional characters to Simplified (OpenCC), 'none' keeps them.")] = "simplified",
    spm_sample: Annotated[int, typer.Option(help="Sentences SentencePiece trains on, sampled at random from the training pairs (half from each side for a joint vocabulary). Its trainer holds them all and sets prepare's peak memory: about 2.7 GB with the default, for sentences of 130 characters; vocabularies of a few thousand to tens of thousands of pieces gain little from more.")] = 800_000,
    spm_model: Annotated[Path | None, typer.Option(help="Use this SentencePiece model for both languages instead of training one: a .model file, or a checkpoint directory of `nmt pretrain` or `nmt train` (so that its weights fit the data; a model with separate vocabularies gives the data both).")] = None,
    workers: Annotated[int, typer.Option(help="Processes that encode large corpora; 0: one per core.")] = 0,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier data dir at --out (never another kind of folder).")] = False,
) -> None:
    """Clean, split, tokenize and binarize a parallel corpus (or monolingual text, with --mono)."""
    from nmt.prepare_request import MONO_OPTIONS, PrepareRequest, prepare_data, prepare_warnings, summary

    def split(text: str) -> tuple[str, ...]:
        return tuple(x.strip() for x in text.split(","))

    with user_errors():
        if mono:
            _refuse_unused_options(ctx, "--mono", {*MONO_OPTIONS, "progress"})
        request = PrepareRequest(
            out=out, src=src, tgt=tgt, mono=list(mono or []), mono_langs=list(split(mono_langs)) if mono_langs else None,
            train=list(train or []), valid=list(valid or []), test=list(test or []), tagged_train=tagged_train, tsv=list(tsv or []),
            tsv_langs=[split(item) for item in tsv_langs or []], hf=hf, hf_config=hf_config, hf_revision=hf_revision,
            corpus=list(corpus or []), directions=directions, zero_shot=zero_shot or "", lang_temperature=lang_temperature, data_dir=data_dir,
            valid_size=valid_size, test_size=test_size, seed=seed, split_by=split_by, normalize=normalize,
            max_words=max_words, max_ratio=max_ratio, dedup=dedup, vocab_size=vocab_size, spm_type=spm_type,
            joint_vocab=joint_vocab, character_coverage=character_coverage, chinese_script=chinese_script,
            spm_sample=spm_sample, spm_model=spm_model, workers=workers, overwrite=overwrite,
        )
        manifest = prepare_data(request, progress=progress)
    typer.echo(summary(out, manifest))
    for warning in prepare_warnings(manifest):
        typer.echo(f"warning: {warning}", err=True)


def _overrides(set_: list[str] | None, data: Path | None, out: Path | None, device: str | None) -> list[str]:
    overrides = list(set_ or [])
    if data is not None:
        overrides.append(f"data_dir={json.dumps(str(data))}")
    if out is not None:
        overrides.append(f"save_dir={json.dumps(str(out))}")
    if device is not None:
        overrides.append(f"train.device={json.dumps(device)}")  # a string, as --device 0 is too
    return overrides


def _report(result) -> None:
    if not result.main_process:
        return
    best = (f"best dev {result.metric_name} {result.best_score:.2f} at step {result.best_step}" if result.best_step
            else "not validated yet")
    typer.echo(
        f"trained {result.steps} steps ({result.epochs} epochs) in {result.seconds:.0f} s, stopped by "
        f"{result.stop_reason or 'end'}; {best}; checkpoints in {result.save_dir}"
    )


@app.command()
def train(
    config: Annotated[Path | None, typer.Argument(help="YAML config, e.g. recipes/multi30k/transformer-cpu.yaml.")] = None,
    data: Annotated[Path | None, typer.Option(help="Data directory from nmt prepare (overrides data_dir).")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Checkpoint directory (overrides save_dir).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config value: section.key=value (repeatable).")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N (overrides train.device).")] = None,
    init: Annotated[Path | None, typer.Option(help="Start from a pretrained masked LM (a checkpoint directory of nmt pretrain), or fine-tune a translation model on this data: every weight of its best/ (a checkpoint directory of nmt train; prepare the data with --spm-model DIR). A fresh optimizer and learning-rate schedule; overrides train.init.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in the checkpoint directory.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Start again, replacing the model in the checkpoint directory.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    devices: Annotated[int, typer.Option(help="Data-parallel processes on this machine, started with torchrun: one per GPU (or CPU processes with --device cpu).")] = 1,
) -> None:
    """Train a model on a prepared data directory."""
    from nmt.config import load_config
    from nmt.distributed import Launch
    from nmt.train import TOO_MANY_SKIPPED
    from nmt.train import train as run_train

    overrides = _overrides(set_, data, out, device)
    if init is not None:
        overrides.append(f"train.init={json.dumps(str(init))}")
    with user_errors():
        settings = load_config(config, overrides)
        result = run_train(settings, resume=resume, overwrite=overwrite, progress=progress,
                           launch=Launch(devices, sys.argv[1:]))
    _report(result)
    if result.exit_code or result.stop_reason == TOO_MANY_SKIPPED:
        raise typer.Exit(result.exit_code or 1)


@app.command()
def pretrain(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Argument(help="YAML config, e.g. recipes/multi30k-lowres/pretrain-cpu.yaml.")] = None,
    data: Annotated[Path | None, typer.Option(help="A monolingual data dir from nmt prepare --mono (read memory-mapped).")] = None,
    text: Annotated[list[Path] | None, typer.Option(help="Monolingual text instead of --data, prepared as nmt prepare --mono does into OUT/data: one sentence per line, a blank line between documents (.gz allowed; repeatable; the language is the file name's suffix).")] = None,
    vocab: Annotated[Path | None, typer.Option(help="With --text, the vocabulary to use: a data dir from nmt prepare or a SentencePiece .model. Default: train one on the text.")] = None,
    vocab_size: Annotated[int, typer.Option(help="Without --vocab: SentencePiece pieces to train (a soft limit).")] = 8000,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Checkpoint directory (overrides save_dir).")] = None,
    nsp: Annotated[bool | None, typer.Option("--nsp/--no-nsp", help="Also train next-sentence prediction (overrides pretrain.next_sentence; off by default).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config value: section.key=value (repeatable).")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N (overrides train.device).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in the checkpoint directory (pass the same --text).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Start again, replacing the model in the checkpoint directory.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    devices: Annotated[int, typer.Option(help="Data-parallel processes on this machine, started with torchrun.")] = 1,
) -> None:
    """Pretrain a Transformer encoder as a masked language model, for nmt train --init to start from."""
    from nmt.config import load_config
    from nmt.distributed import Launch
    from nmt.pretrain import pretrain as run_pretrain

    overrides = _overrides(set_, None, out, device)
    if nsp is not None:
        overrides.append(f"pretrain.next_sentence={str(nsp).lower()}")
    with user_errors():
        if data is not None or vocab is not None:  # they bring the vocabulary
            _refuse_unused_options(ctx, "--data or --vocab", set(ctx.params) - {"vocab_size"})
        settings = load_config(config, overrides)
        result = run_pretrain(
            settings, list(text or []), vocab, vocab_size, resume=resume, overwrite=overwrite, progress=progress, data=data,
            launch=Launch(devices, sys.argv[1:]),
        )
    _report(result)
    if result.exit_code:
        raise typer.Exit(result.exit_code)


@app.command("fill-mask")
def fill_mask(
    model_dir: Annotated[Path, typer.Argument(help="Checkpoint directory from nmt pretrain.")],
    text: Annotated[list[str] | None, typer.Argument(help="Sentences with [MASK] where a word is missing (default: lines from stdin).")] = None,
    top_k: Annotated[int, typer.Option(help="Candidates to show for each mask.")] = 5,
    checkpoint: Annotated[str, typer.Option(help="Which weights: best or last.")] = "best",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
) -> None:
    """Show the best fill of each [MASK] in a sentence and its top-k candidates with their probabilities."""
    from nmt.data import decode_lines
    from nmt.pretrain import fill_mask_lines

    with user_errors():
        for filled in fill_mask_lines(model_dir, text or decode_lines(sys.stdin.buffer, "<stdin>"), top_k, checkpoint, device):
            typer.echo(filled.text)
            for number, mask in enumerate(filled.masks, 1):
                typer.echo(f"  [MASK] {number}: " + ", ".join(f"{piece} {p:.3f}" for piece, p in mask.candidates))


@app.command()
def translate(
    model_dirs: Annotated[list[Path], typer.Argument(help="Checkpoint directory from nmt train; several make an ensemble (they must share one vocabulary). With --engine ctranslate2: one directory from nmt export.", metavar="MODEL_DIR...")],
    input: Annotated[Path | None, typer.Option("--input", "-i", help="Text to translate, one sentence per line (default, or -: stdin).")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Where to write translations (default, or -: stdout).")] = None,
    beam: Annotated[int | None, typer.Option(help="Beam size; 1 is greedy search.")] = None,
    nbest: Annotated[int | None, typer.Option(help="Write the N best as 'line ||| text ||| score'.")] = None,
    len_penalty: Annotated[float | None, typer.Option(help="Score = log-prob / length**len_penalty (greedy too; sampling: the log-prob).")] = None,
    max_len_a: Annotated[float | None, typer.Option(help="Longest output = a * source length + b.")] = None,
    max_len_b: Annotated[int | None, typer.Option(help="Longest output = a * source length + b.")] = None,
    batch_tokens: Annotated[int | None, typer.Option(help="Source tokens per decoding batch.")] = None,
    precision: Annotated[str | None, typer.Option(help="fp32, or bf16 / fp16 autocast (for GPUs).")] = None,
    no_repeat_ngram: Annotated[int | None, typer.Option(help="No n-gram of this size occurs twice in an output; 0: off.")] = None,
    sampling: Annotated[bool | None, typer.Option("--sampling/--no-sampling", help="Draw each token from the model's distribution instead of beam search; --nbest N draws N samples (default: the model's decode.sampling, normally off).", show_default=False)] = None,
    topk: Annotated[int | None, typer.Option(help="With --sampling: draw from the K most probable tokens; 0: all.")] = None,
    topp: Annotated[float | None, typer.Option(help="With --sampling: draw from the smallest set of tokens whose probability reaches P.")] = None,
    temperature: Annotated[float | None, typer.Option(help="With --sampling: divide the log-probabilities by T (below 1: closer to greedy).")] = None,
    seed: Annotated[int | None, typer.Option(help="With --sampling: the random seed (the same seed draws the same samples).")] = None,
    prefix: Annotated[Path | None, typer.Option(help="One target prefix per input line (empty: none) that the translation must start with.")] = None,
    prefix_only: Annotated[bool | None, typer.Option("--prefix-only", help="With --prefix: each prefix is the whole translation (its score with --nbest, its attention with --attention).", show_default=False)] = None,
    stream: Annotated[bool, typer.Option("--stream", help="Translate and write each line as soon as it is read (interactive use, pipes).")] = False,
    static_cache: Annotated[bool | None, typer.Option("--static-cache/--no-static-cache", help="Transformers: decode on fixed-shape buffers, each step a replayed CUDA graph on a GPU (the incremental path's output; in half precision the fixed shapes may round a few lines otherwise).", show_default=False)] = None,
    chunk_lines: Annotated[int | None, typer.Option(help="Lines read, sorted and translated at a time.")] = None,
    checkpoint: Annotated[str | None, typer.Option(help="Which weights of a checkpoint directory: best (default) or last.", show_default=False)] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    replace_invalid: Annotated[bool, typer.Option(help="Replace invalid UTF-8 instead of stopping.")] = False,
    int8: Annotated[bool, typer.Option(help="Run the Linear layers in int8 (dynamic quantization; CPU only).")] = False,
    attention: Annotated[Path | None, typer.Option(help="Write the decoder's cross-attention here: a heat-map PNG per line and alignments.txt ('i-j' pairs, one line per input line).")] = None,
    attention_lines: Annotated[int, typer.Option(help="With --attention: heat-maps for the first N lines only; 0: every line.")] = 0,
    attention_layer: Annotated[int | None, typer.Option(help="With --attention: Transformer decoder layer, from 1 (default: the last).")] = None,
    attention_head: Annotated[int | None, typer.Option(help="With --attention: Transformer head, from 1 (default: the mean over heads).")] = None,
    attention_words: Annotated[bool, typer.Option(help="With --attention: merge subword pieces into words (source: sum, output: mean).")] = False,
    json_weights: Annotated[bool, typer.Option("--json", help="With --attention: also write the weights to attention.jsonl.")] = False,
    engine: Annotated[str, typer.Option(help="nmt, or ctranslate2 for a directory from nmt export (no ensembles; its attention: the last layer's mean over heads).")] = "nmt",
    tgt_lang: Annotated[str | None, typer.Option(help="The target language of a multilingual model (it starts each source with that language's tag).")] = None,
    src_lang: Annotated[str | None, typer.Option(help="The input's language, for a multilingual model that normalizes its languages differently (and for --pivot).")] = None,
    pivot: Annotated[str | None, typer.Option(help="Translate into this language first, then from it into --tgt-lang.")] = None,
    pivot_model: Annotated[list[Path] | None, typer.Option(help="With --pivot: the model(s) for the second step (default: the same).")] = None,
    restrict_vocab: Annotated[bool | None, typer.Option("--restrict-vocab/--no-restrict-vocab", help="A multilingual model: output only the pieces its training targets in --tgt-lang use (keeps zero-shot directions in their language).", show_default=False)] = None,
) -> None:
    """Translate text with a trained model: one output line per input line."""
    from nmt.alignment import AttentionOutput
    from nmt.models.attention import AttentionChoice
    from nmt.translate import LanguageChoice, translate_file

    options = dict(beam=beam, nbest=nbest, len_penalty=len_penalty, max_len_a=max_len_a, max_len_b=max_len_b,
                   batch_tokens=batch_tokens, precision=precision, no_repeat_ngram=no_repeat_ngram, sampling=sampling,
                   topk=topk, topp=topp, temperature=temperature, seed=seed, chunk_lines=chunk_lines,
                   prefix_only=prefix_only, static_cache=static_cache, restrict_vocab=restrict_vocab)
    with user_errors():
        if prefix_only and prefix is None:
            raise NmtError("--prefix-only needs --prefix FILE")
        attention_output = None
        if attention is not None:
            if attention_lines < 0:
                raise NmtError("--attention-lines must be 0 (every line) or more")
            attention_output = AttentionOutput(
                attention, AttentionChoice(attention_layer, attention_head), attention_lines, attention_words,
                json_weights,
            )
        elif attention_layer or attention_head or attention_words or json_weights or attention_lines:
            raise NmtError("--attention-layer, --attention-head, --attention-words, --attention-lines and --json need --attention DIR")
        translate_file(
            model_dirs, input, output, options, checkpoint, device, replace_invalid, quantize=int8,
            attention=attention_output, prefix_path=prefix, stream=stream, engine=engine,
            languages=LanguageChoice(tgt_lang, src_lang), pivot=pivot, pivot_dirs=pivot_model,
        )


@app.command()
def serve(
    model_dirs: Annotated[list[Path], typer.Argument(help="Checkpoint directories (or exports with --engine ctranslate2), one per language pair.", metavar="MODEL_DIR...")],
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 for every interface.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on; 0 picks a free one.")] = 5000,
    api_key: Annotated[list[str] | None, typer.Option(help="Require this key (repeatable): api_key in the body or query, X-API-Key, or a bearer token.")] = None,
    api_keys_file: Annotated[Path | None, typer.Option(help="Require one of the keys in this file (one per line).")] = None,
    max_chars: Annotated[int, typer.Option(help="Characters per request, all lines together.")] = 5000,
    max_line_chars: Annotated[int, typer.Option(help="Characters per line.")] = 1000,
    max_lines: Annotated[int, typer.Option(help="Lines per request.")] = 100,
    max_alternatives: Annotated[int, typer.Option(help="Most alternatives a request may ask for.")] = 8,
    timeout: Annotated[float, typer.Option(help="Seconds a request may wait for its translation (then 503).")] = 30.0,
    batch_wait_ms: Annotated[float, typer.Option(help="Milliseconds to wait for more requests to translate together.")] = 5.0,
    max_batch_lines: Annotated[int, typer.Option(help="Most lines translated in one batch.")] = 256,
    max_attention_weights: Annotated[int, typer.Option(help="Most attention weights in one answer: the maps of the lines past it are left out.")] = 250_000,
    cors_origin: Annotated[list[str] | None, typer.Option(help="Let web pages of this origin call the API from a browser (repeatable; * for any).")] = None,
    beam: Annotated[int | None, typer.Option(help="Beam size; 1 is greedy search.")] = None,
    engine: Annotated[str, typer.Option(help="nmt, or ctranslate2 for a directory from nmt export.")] = "nmt",
    checkpoint: Annotated[str | None, typer.Option(help="Which weights of a checkpoint directory: best (default) or last.", show_default=False)] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    int8: Annotated[bool, typer.Option(help="Run the Linear layers in int8 (CPU only).")] = False,
) -> None:
    """Serve models over HTTP (LibreTranslate and OpenNMT-py APIs) with a web page at /."""
    from nmt.serve import read_api_keys
    from nmt.serve import serve as run_server
    from nmt.serve.api import ServeSettings

    with user_errors():
        keys = frozenset(api_key or []) | (read_api_keys(api_keys_file) if api_keys_file else frozenset())
        settings = ServeSettings(host=host, port=port, api_keys=keys, max_chars=max_chars, max_line_chars=max_line_chars,
                                 max_lines=max_lines, max_alternatives=max_alternatives, timeout_s=timeout,
                                 batch_wait_ms=batch_wait_ms, max_batch_lines=max_batch_lines,
                                 max_attention_weights=max_attention_weights, cors_origins=tuple(cors_origin or ()))
        run_server(model_dirs, settings, {"beam": beam}, checkpoint, device, int8, engine, echo=typer.echo)


@app.command()
def evaluate(
    hyp: Annotated[Path | None, typer.Option(help="Translations, one per line.")] = None,
    ref: Annotated[Path | None, typer.Option(help="References, one per line.")] = None,
    src: Annotated[Path | None, typer.Option(help="Source text to translate first with --model.")] = None,
    model: Annotated[Path | None, typer.Option(help="Checkpoint directory for --src or --data.")] = None,
    data: Annotated[Path | None, typer.Option(help="Translate and score each direction of this data dir's split with --model (a multilingual one: every direction, zero-shot included).")] = None,
    split: Annotated[str, typer.Option(help="With --data: valid or test.")] = "test",
    directions: Annotated[str | None, typer.Option(help="With --data: only these directions, e.g. de-fr,fr-de.")] = None,
    pivot: Annotated[str | None, typer.Option(help="With --data: translate through this language.")] = None,
    pivot_model: Annotated[list[Path] | None, typer.Option(help="With --pivot: the model(s) for the second step (default: --model).")] = None,
    hyp_dir: Annotated[Path | None, typer.Option(help="With --data: keep the translations here (SPLIT.DIRECTION.hyp).")] = None,
    off_target: Annotated[bool, typer.Option("--off-target", help="With --data: also the share of output lines in another language than the target (py3langid).")] = False,
    beam: Annotated[int | None, typer.Option(help="Beam size when translating --src or --data.")] = None,
    restrict_vocab: Annotated[bool | None, typer.Option("--restrict-vocab/--no-restrict-vocab", help="When translating with a multilingual model: output only the target language's pieces (see nmt translate).", show_default=False)] = None,
    metrics: Annotated[str, typer.Option(help="Comma-separated: bleu, chrf, ter.")] = "bleu,chrf,ter",
    tokenize: Annotated[str | None, typer.Option(help="sacreBLEU tokenizer for BLEU (default: zh for Chinese, ja-mecab for Japanese, ko-mecab for Korean, else 13a).")] = None,
    lang: Annotated[str | None, typer.Option(help="Language of the references, which picks BLEU's tokenizer (default: the model's target language with --model, else recognised from the references).")] = None,
    tgt_lang: Annotated[str | None, typer.Option(help="With --src: the target language of a multilingual model.")] = None,
    src_lang: Annotated[str | None, typer.Option(help="With --src: its language, for a multilingual model that normalizes its languages differently.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N (with --src or --data).")] = "auto",
) -> None:
    """Score translations against references with sacreBLEU."""
    from nmt.evaluate import EvaluateRequest
    from nmt.evaluate import evaluate as run_evaluate
    from nmt.multilingual import parse_directions

    with user_errors():
        if sys.stdout is None:  # the scores are this command's only output
            raise NmtError("the standard output is closed: nowhere to print the scores")
        report = run_evaluate(EvaluateRequest(
            hyp=hyp, ref=ref, src=src, model=model, data=data, split=split,
            directions=None if directions is None else parse_directions(directions), pivot=pivot,
            pivot_models=pivot_model, hyp_dir=hyp_dir, off_target=off_target,
            decode_options={"beam": beam, "restrict_vocab": restrict_vocab},
            metrics=tuple(m.strip().lower() for m in metrics.split(",") if m.strip()), tokenize=tokenize, lang=lang,
            tgt_lang=tgt_lang, src_lang=src_lang, device=device,
        ))
    typer.echo(json.dumps(report.as_json(), indent=2) if json_output else report.text())


@app.command()
def average(
    model_dir: Annotated[Path, typer.Argument(help="Checkpoint directory of nmt train, trained with train.keep_last or keep_best.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Model directory to write (new or empty).")],
    last: Annotated[int, typer.Option(help="Average the N latest kept checkpoints.")] = 0,
    best: Annotated[int, typer.Option(help="Average the N kept checkpoints with the best dev score.")] = 0,
) -> None:
    """Write a model directory whose weights are the mean of several checkpoints of one run."""
    from nmt.average import average_checkpoints

    with user_errors():
        chosen = average_checkpoints(model_dir, out, last, best)
    steps = ", ".join(str(c.step) for c in chosen)
    typer.echo(f"{out}: the mean of {len(chosen)} checkpoints (steps {steps}); translate with: nmt translate {out}")


@app.command()
def export(
    model_dir: Annotated[Path, typer.Argument(help="Checkpoint directory of a Transformer from nmt train.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write: the model with its vocabularies and settings.")],
    format: Annotated[str, typer.Option("--format", help="Export format: ctranslate2.")] = "ctranslate2",
    quantization: Annotated[str | None, typer.Option(help="Store the weights as int8 (7 bits, safe on CPUs without VNNI), int8_float16 or float16 (default: float32).")] = None,
    checkpoint: Annotated[str, typer.Option(help="Which weights: best or last.")] = "best",
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier export at --out (never another kind of folder).")] = False,
) -> None:
    """Write a trained Transformer as a CTranslate2 model directory that translates on its own."""
    from nmt.export import export_model

    with user_errors():
        record = export_model(model_dir, out, format, quantization, checkpoint, overwrite)
    typer.echo(f"{out}: {record.format} model of {record.checkpoint} (step {record.step}, {record.quantization or 'float32'}); "
               f"translate with: nmt translate {out} --engine ctranslate2")


@app.command()
def plot(
    runs: Annotated[list[Path], typer.Argument(help="Checkpoint directories of nmt train; several are drawn over each other.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write (into an existing folder: FOLDER/training-curves.png).")] = Path("training-curves.png"),
) -> None:
    """Draw loss, dev BLEU and learning rate against training steps."""
    from nmt.plots import plot_training

    with user_errors():
        path = plot_training(runs, out)
    typer.echo(f"training curves of {len(runs)} run(s) in {path}")


@app.command("bench-scale")
def bench_scale(
    data: Annotated[Path, typer.Option(help="Folder with the Multi30k training files (train.de.gz, train.en.gz).")] = LOCAL_MULTI30K,
    pairs: Annotated[int, typer.Option(help="Pairs in the synthetic corpus (WMT14 en-de has 4.5M).")] = 4_500_000,
    ratio: Annotated[int, typer.Option(help="Also measure a corpus this many times smaller.")] = 10,
    steps: Annotated[int, typer.Option(help="Training updates of the small model.")] = 200,
    work_dir: Annotated[Path | None, typer.Option(help="Keep the corpora, data dirs and models here.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Also write the report here (JSON).")] = None,
    mono: Annotated[bool, typer.Option(help="Monolingual instead: --pairs sentences through nmt prepare --mono and nmt pretrain --data.")] = False,
    translate: Annotated[Path | None, typer.Option(help="A model dir: translate --pairs source sentences with it instead, and measure --stream's latency.")] = None,
    beam: Annotated[int | None, typer.Option(help="With --translate: the beam size (default: the model's).")] = None,
    src: Annotated[str, typer.Option(help="Source language of the training files.")] = "de",
    tgt: Annotated[str, typer.Option(help="Target language of the training files.")] = "en",
) -> None:
    """Measure prepare and training (or translation) start-up, time and memory on a large synthetic input and on a smaller one."""
    from nmt.bench_scale import ScaleBenchConfig, run_scale_bench

    with user_errors():
        report = run_scale_bench(ScaleBenchConfig(data=data, pairs=pairs, ratio=ratio, steps=steps, work_dir=work_dir,
                                                  out=out, mono=mono, translate=translate, beam=beam, src=src, tgt=tgt))
    typer.echo(json.dumps(report))


@app.command("bench-serve")
def bench_serve(
    model_dir: Annotated[Path, typer.Argument(help="Checkpoint directory (or export with --engine ctranslate2).")],
    src: Annotated[Path, typer.Option(help="Lines to send, one request each.")] = LOCAL_MULTI30K / "test_2016_flickr.de.gz",
    clients: Annotated[str, typer.Option(help="Comma-separated numbers of concurrent clients.")] = "1,8,32",
    lines: Annotated[int | None, typer.Option(help="Send only the first N lines.")] = None,
    beam: Annotated[int | None, typer.Option(help="Beam size (default: the model's).")] = None,
    engine: Annotated[str, typer.Option(help="nmt or ctranslate2.")] = "nmt",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Also write the report here (JSON).")] = None,
) -> None:
    """Throughput and latency of nmt serve under concurrent clients, batched and one request at a time."""
    from nmt.serve.bench import bench_serve as run_bench

    with user_errors():
        try:
            counts = [int(n) for n in clients.split(",") if n.strip()]
        except ValueError:
            raise NmtError(f"--clients must be numbers separated by commas (got {clients!r})") from None
        if not counts or min(counts) < 1:
            raise NmtError("--clients needs numbers of 1 or more")
        run_bench(model_dir, src, counts, lines, beam, device, engine, echo=typer.echo, out=out)


def _named_paths(values: list[str] | None, option: str) -> dict[str, Path]:
    """["transformer=path", ...] -> {"transformer": Path("path")}."""
    named = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise NmtError(f"{option} takes NAME=PATH, got {value!r}")
        named[name] = Path(path)
    return named


@app.command()
def bench(
    data: Annotated[Path, typer.Option(help="Folder with the Multi30k files (train.de.gz, val.*, test_2016_flickr.*).")] = LOCAL_MULTI30K,
    out: Annotated[Path, typer.Option("--out", "-o", help="JSON report.")] = Path("bench.json"),
    sections: Annotated[str, typer.Option(help="Comma-separated: train, ttq (time to quality), decode.")] = "train,ttq,decode",
    recipe: Annotated[list[str] | None, typer.Option(help="NAME=CONFIG to benchmark (repeatable); default: the Multi30k transformer and rnn recipes for the device.")] = None,
    checkpoint: Annotated[list[str] | None, typer.Option(help="NAME=CHECKPOINT_DIR to decode instead of training one (repeatable).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    steps: Annotated[int, typer.Option(help="Timed training updates per repeat (0: 40 on a GPU, 4 on a CPU).")] = 0,
    repeats: Annotated[int, typer.Option(help="Repeats of each measurement; the median is reported.")] = 3,
    vocab_size: Annotated[int, typer.Option(help="Joint vocabulary size (0: 8000 on a GPU, 5000 on a CPU).")] = 0,
    ttq_bleu: Annotated[float, typer.Option(help="Dev BLEU to reach for time to quality (0: 35 on a GPU, 20 on a CPU).")] = 0.0,
    ttq_minutes: Annotated[float, typer.Option(help="Longest training for time to quality (0: 10 minutes).")] = 0.0,
    work_dir: Annotated[Path | None, typer.Option(help="Keep the prepared data and trained models here; a later run decodes a model again where its model settings and vocabulary are the recipe's and the data's (else trains it again).")] = None,
    cpu_bf16: Annotated[bool | None, typer.Option("--cpu-bf16/--no-cpu-bf16", help="On a CPU, also time the training step in bf16 (default: where the CPU has bf16 instructions, AVX512_BF16 or AMX).", show_default=False)] = None,
) -> None:
    """Measure training and decoding speed on Multi30k de-en; print a table and write JSON."""
    from nmt.bench import BenchConfig, format_report, run_bench

    with user_errors():
        if repeats < 1 or steps < 0:
            raise NmtError("--repeats must be at least 1 and --steps at least 0")
        config = BenchConfig(
            data=data, out=out, recipes=_named_paths(recipe, "--recipe") or None,
            checkpoints=_named_paths(checkpoint, "--checkpoint"),
            sections=tuple(s.strip() for s in sections.split(",") if s.strip()), device=device,
            steps=steps, repeats=repeats, vocab_size=vocab_size, ttq_bleu=ttq_bleu, ttq_minutes=ttq_minutes,
            work_dir=work_dir, cpu_bf16_training=cpu_bf16,
        )
        report = run_bench(config)
    typer.echo(format_report(report))
    typer.echo(f"\nwritten to {out}")


def main() -> None:
    """The `nmt` command. A command's last output (a summary, the scores) written to a full disk
    or a closed pipe is a one-line error too, as its own writes are."""
    try:
        app()
    except OSError as e:
        typer.echo(_os_error_line(e), err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
