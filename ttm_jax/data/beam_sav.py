"""The pixel part of SA-V preparation as Apache Beam transforms, for the TFDS builder `sav_clips` (`tfds_sav.py`).

    python -m ttm_jax.data.prepare --format=tfds --sav=PATH --captions=JSONL --out=DATA_DIR \
        --beam_pipeline_options="runner=DirectRunner,direct_num_workers=2"

or `tfds_sav.build(..., beam_options="runner=DataflowRunner,project=...,region=...,setup_file=./setup.py")` (any
runner: DirectRunner locally, Dataflow / Spark / Flink unchanged; workers need this package installed, e.g. Dataflow's
`setup_file`). Apache Beam is the optional extra `pip install -e .[beam]`; this module imports it only when a pipeline
is built, so `ttm_jax.data` imports without it.

The pipeline (one element per video until the clips are cut):

    Create(VideoRef)                             the refs found on the launching host (`sav.find_videos`)
    | Reshuffle                                  spread the videos over the workers
    | ReadAnnotation (side input: the captions   caption lookup, annotation json -> RLE masklets, fps check
                      sidecar, read by a worker)
    | CutClips                                   decode the clip's frames (PyAV), rasterise + select masks, crop and
                                                 resize, trajectory: `clips.make_examples` per video, its seeds
                                                 `clips.clip_seed(seed, video_id, c)`
    -> ("<video_id>/<clip>", example)            what TFDS serialises and writes (array_record)

Each record equals the single-process builder's (`SavClips._generate_examples`) and `prepare`'s for the same seed:
the same function of the same (seed, video id, clip). A video whose caption, annotation or mp4 fails raises
`SkipVideo` in a transform; it is logged with its file and counted as the Beam counter `skipped:<reason>` (namespace
`sav_clips`) together with `videos_ok` and `records`; `counts(pipeline_result)` reads them back after the run (the
builder stores them in the dataset's metadata, as the single-process build does). A video yields all its clips or
none, as in the single-process build.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import ml_collections

from ttm_jax.data import captions as captions_lib
from ttm_jax.data import clips, sav
from ttm_jax.data.video_io import SkipVideo

NAMESPACE = "sav_clips"  # of the Beam counters
SKIP_PREFIX = "skipped:"
VIDEOS_OK = "videos_ok"
RECORDS = "records"
EXTRA = "beam"  # setup.py's extra: pip install -e .[beam]


def require_beam() -> Any:
    """`apache_beam`, or an ImportError naming the extra to install."""
    try:
        import apache_beam
    except ImportError as e:
        raise ImportError(f"Apache Beam is not installed: `pip install -e .[{EXTRA}]` (setup.py extra '{EXTRA}') "
                          "to prepare with --beam_pipeline_options; or leave the option out for the single-process "
                          "build") from e
    return apache_beam


def pipeline_options(options: Any) -> Any:
    """`beam.options.pipeline_options.PipelineOptions` from `"key=value,key=value"` (the `tfds build
    --beam_pipeline_options` spelling), a list of `--key=value` flags, or PipelineOptions (returned as is)."""
    beam = require_beam()
    if isinstance(options, beam.options.pipeline_options.PipelineOptions):
        return options
    if isinstance(options, str):
        options = [f"--{o.strip().lstrip('-')}" for o in options.split(",") if o.strip()]
    return beam.options.pipeline_options.PipelineOptions(flags=list(options))


def _count(name: str, n: int = 1) -> None:
    from apache_beam.metrics import Metrics  # beam is installed: this runs inside a pipeline

    Metrics.counter(NAMESPACE, name).inc(n)


def _skip(err: SkipVideo) -> None:
    logging.warning("%s (beam): skipped %s", NAMESPACE, err)
    _count(SKIP_PREFIX + err.reason)


def read_annotation(element: sav.VideoRef | tuple[sav.VideoRef, captions_lib.CaptionEntry | None],
                    captions: Mapping[str, captions_lib.CaptionEntry] | None = None, *,
                    data_config: ml_collections.ConfigDict) -> Iterator[tuple]:
    """`ref` (its caption looked up in `captions`, the side input) or `(ref, caption entry or None)` -> `(ref, entry)`
    if the caption, the annotation and its fps are usable, else nothing and a `skipped:<reason>` count (the cheap
    checks, before any decoding)."""
    if isinstance(element, sav.VideoRef):
        ref, entry = element, (captions or {}).get(element.video_id)
    else:
        ref, entry = element
    try:
        entry = captions_lib.lookup({} if entry is None else {ref.video_id: entry}, ref.video_id,
                                    file=ref.video.name, missing=data_config.get("missing_captions", "skip"))
        ann = sav.read_annotation(ref)
        clips.check_fps(ann, float(data_config.fps))
    except SkipVideo as e:
        _skip(e)
        return
    yield ref, entry


def cut_clips(element: tuple, *, data_config: ml_collections.ConfigDict, seed: int,
              clips_per_video: int) -> Iterator[tuple[str, dict]]:
    """`(ref, entry)` -> `("<video_id>/<clip>", example)` for each clip (all or none of a video): frames decoded,
    masks rasterised and cut to the clip (`clips.make_examples`; the annotation is parsed again there rather than
    shipped between workers: it costs little next to decoding)."""
    ref, entry = element
    seeds = [clips.clip_seed(seed, ref.video_id, c) for c in range(clips_per_video)]
    try:
        examples = clips.make_examples(ref, entry, data_config, seeds)
    except SkipVideo as e:
        _skip(e)
        return
    _count(VIDEOS_OK)
    _count(RECORDS, len(examples))
    for c, e in enumerate(examples):
        e["clip"] = c
        yield f"{ref.video_id}/{c}", e


def clips_transform(refs: Sequence[sav.VideoRef], captions: str | Mapping[str, captions_lib.CaptionEntry],
                    data_config: ml_collections.ConfigDict, *, seed: int, clips_per_video: int) -> Any:
    """The `beam.PTransform` (applied to a pipeline's root) yielding `("<video_id>/<clip>", example)`.

    `captions`: the sidecar's path (read by a worker and given to `ReadAnnotation` as a side input: the job graph
    holds only the refs, however many captions there are; use a path every worker reads, e.g. gs://), or a mapping
    (each video's own entry then travels with its ref; for small inputs).
    """
    beam = require_beam()
    data_config = ml_collections.ConfigDict(data_config.to_dict())  # a plain copy: no references to a larger config
    by_path = isinstance(captions, str | os.PathLike)
    elements = list(refs) if by_path else [(r, captions.get(r.video_id)) for r in refs]
    path = os.fspath(captions) if by_path else None

    @beam.ptransform_fn
    def _clips(root):
        videos = (root
                  | "Create" >> beam.Create(elements)
                  | "Reshuffle" >> beam.Reshuffle())
        if by_path:
            side = beam.pvalue.AsSingleton(root | "CaptionsPath" >> beam.Create([path])
                                           | "LoadCaptions" >> beam.Map(captions_lib.load_captions))
            checked = videos | "ReadAnnotation" >> beam.FlatMap(read_annotation, side, data_config=data_config)
        else:
            checked = videos | "ReadAnnotation" >> beam.FlatMap(read_annotation, data_config=data_config)
        return checked | "CutClips" >> beam.FlatMap(cut_clips, data_config=data_config, seed=int(seed),
                                                    clips_per_video=int(clips_per_video))

    return _clips()


def counts(pipeline_result: Any) -> tuple[int, int, dict[str, int]]:
    """-> (videos_ok, records, {reason: skipped videos}) from the finished pipeline's `sav_clips` counters
    (committed values where the runner has them, else attempted)."""
    from apache_beam.metrics.metric import MetricsFilter

    result = pipeline_result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
    values: dict[str, int] = {}
    for c in result["counters"]:
        try:
            v = c.committed
        except Exception:  # runners without committed metrics raise on access
            v = None
        if v is None:
            v = c.attempted
        values[c.key.metric.name] = values.get(c.key.metric.name, 0) + int(v or 0)
    skipped = {k[len(SKIP_PREFIX):]: v for k, v in values.items() if k.startswith(SKIP_PREFIX) and v}
    return values.get(VIDEOS_OK, 0), values.get(RECORDS, 0), skipped
