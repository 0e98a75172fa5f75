"""Data ingest: shard size, delivered samples/s against a DataLoader, preprocessing scaling, memory.

    python bench/ingest.py [--clips 300] [--images 300] [--batch 32] [--epochs 2]
                           [--work DIR] [--out bench/results] [--quick]

Two fixtures are written into --work (a temporary folder by default), each in its dataset's
official layout, with JPEG files as the real datasets have them (photo-like content: smooth
colour fields, blurred shapes, texture and mild noise, JPEG quality 90):

- CREMA-D (`mmray.data.sources.cremad`): AudioWAV/<clip>.wav, 16 kHz mono 16-bit PCM of 5 s (the
  reference crop length; real clips are about 2.5 s, see the extrapolation), and
  Image-01-FPS/<clip>/frame_0000k.jpg, 3 frames of 224 × 224; clip names 1001_DFA_ANG_XX, ...
- UPMC Food-101 (`mmray.data.sources.food101`): images/{train,test}/<class>/<class>_<n>.jpg of
  about 512 × 384, and texts/{train,test}_titles.csv.

Both are read with their dataset configs (configs/datasets/cremad.yaml: STFT audio at 16 kHz, 5 s,
3 frames at 224 px; food101.yaml: 224 px, hashed titles) and measured for:

1. Shard bytes per sample (all of a version's Parquet files / rows) ÷ raw bytes per sample (the
   input files a sample reads / samples), under the default encodings (JPEG images, 16-bit PCM
   audio) and the old ones (data.image.encoding=float32 data.audio.encoding=float32); goal ≤ 1.5.
   Also extrapolated to the full datasets (7,442 CREMA-D clips, ~90,000 UPMC Food-101 images).
2. Samples/s delivered to the training loop, after decode and train augmentation
   (random_resized_crop + flip), restricted to 1 and to 2 CPUs (`os.sched_setaffinity`, torch
   threads = CPUs; one fresh process per setting): mmray's `SplitReader` over the cached train
   split (threads = CPUs; `reader.batches`, the torch batches the loop gets) and over the streamed
   one (`ParquetRows`), against a `torch.utils.data.DataLoader` over the raw files doing the same
   decode and transforms per sample (num_workers = CPUs, persistent workers, default collate).
   The first batch is warm-up and not timed. Goal: mmray ≥ 1.0 × the DataLoader.
3. Preprocessing samples/s (`mmray.data.preprocess.preprocess`, forced) with data.parallelism 1
   and 2, each in a fresh process with a local Ray of 2 CPUs (a Ray temp folder of its own, so
   it never joins a cluster already running here); only the preprocess call is timed (Ray's
   start-up is reported beside it). Goal: ≥ 1.6 × from 1 to 2 workers. Beside it, the featurizer
   alone (no Ray, 1 CPU) over the same samples: the work without the pipeline around it.
4. Peak resident memory (ru_maxrss) of one epoch of the train split, streamed and cached, each in
   a fresh process, next to the RSS before and the split's shard bytes.

Each samples/s figure comes with the CPU its process used (cores, with a DataLoader's workers) and
the CPU other processes used meanwhile (from /proc): a busy machine lowers every figure.
--quick: tiny fixtures, every measurement of a kind in one process, under a minute; it checks
that the benchmark runs (its figures mean nothing) and writes files only with --out.
Writes ingest.json and ingest.md into --out (default bench/results); --work keeps the fixtures,
shards and per-measurement logs (<work>/logs/) for a look afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_RATE = 16000
WAV_SECONDS = 5.0  # the fixture's clips: the reference 5 s crop, so no zero padding
FRAMES = 3
FRAME_SIDE = 224
QUALITY = 90
RAY_CPUS = 2
# Full datasets for the extrapolation: CREMA-D's clips (about 2.5 s each) and UPMC Food-101's
# images (67,988 train + 22,716 test, rounded).
FULL = {"cremad": 7442, "food101": 90_000}
REAL_CREMAD_SECONDS = 2.5
EMOTIONS = ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")
SENTENCES = ("DFA", "IEO", "IOM", "ITH", "ITS", "IWL", "IWW", "MTI", "TAI", "TIE", "TSI", "WSI")
FOODS = ("apple_pie", "baby_back_ribs", "baklava", "beef_carpaccio", "beef_tartare", "beet_salad",
         "beignets", "bibimbap", "bread_pudding", "breakfast_burrito")
# The reference train transforms (what the dataset configs set), and none (float32 shards).
TRAIN_AUGMENT = ["data.augment.image_train=random_resized_crop", "data.augment.flip=true"]
NO_AUGMENT = ["data.augment.image_train=none", "data.augment.flip=false"]
OLD_ENCODING = ["data.image.encoding=float32", "data.audio.encoding=float32"]


# -- fixtures ---------------------------------------------------------------------------------


def photo_base(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """(h, w, 3) float32 picture that compresses like a photo: a smooth colour field, blurred
    shapes and a mid-frequency texture (noise is added per frame)."""
    from PIL import Image, ImageDraw, ImageFilter

    grid = rng.integers(0, 256, (int(rng.integers(2, 5)), int(rng.integers(2, 5)), 3), dtype=np.uint8)
    img = Image.fromarray(grid).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 10))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = (x0, y0, x0 + int(rng.integers(w // 10, w // 2)), y0 + int(rng.integers(h // 10, h // 2)))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.6 else draw.rectangle)(box, fill=fill)
    img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(1.0, 2.0))))
    texture = rng.normal(0, 16, (h // 4, w // 4)).astype(np.float32)
    texture = np.asarray(Image.fromarray(texture, "F").resize((w, h), Image.BICUBIC))
    return np.asarray(img, dtype=np.float32) + texture[..., None]


def save_jpeg(base: np.ndarray, rng: np.random.Generator, path: Path, shift: int = 0) -> None:
    from PIL import Image

    arr = np.roll(base, shift, axis=1) + rng.normal(0, 3, base.shape).astype(np.float32)
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=QUALITY)


def speech_like(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """A voiced tone with a syllable-rate envelope and a little noise, in [-1, 1]."""
    t = np.arange(int(SAMPLE_RATE * seconds)) / SAMPLE_RATE
    f0 = rng.uniform(100, 220) * (1 + 0.05 * np.sin(2 * np.pi * 0.5 * t))
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    voice = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = np.clip(np.sin(2 * np.pi * rng.uniform(3, 5) * t + rng.uniform(0, 6)), 0, None)
    wave = 0.2 * voice * envelope + 0.01 * rng.standard_normal(len(t))
    return np.clip(wave, -1, 1)


def write_cremad(root: Path, clips: int, seed: int = 0) -> None:
    """AudioWAV/<clip>.wav and Image-01-FPS/<clip>/frame_0000k.jpg, clips named
    <actor>_<sentence>_<emotion>_XX (emotions balanced)."""
    import soundfile

    rng = np.random.default_rng(seed)
    (root / "AudioWAV").mkdir(parents=True, exist_ok=True)
    names = [f"{1001 + a}_{s}_{e}_XX" for a in range(91) for s in SENTENCES for e in EMOTIONS][:clips]
    for name in names:
        soundfile.write(root / "AudioWAV" / f"{name}.wav", speech_like(rng, WAV_SECONDS), SAMPLE_RATE,
                        subtype="PCM_16")
        folder = root / "Image-01-FPS" / name
        folder.mkdir(parents=True, exist_ok=True)
        base = photo_base(rng, FRAME_SIDE, FRAME_SIDE)  # one scene per clip, a little motion
        for k in range(FRAMES):
            save_jpeg(base, rng, folder / f"frame_{k + 1:05d}.jpg", shift=3 * k)


def write_food101(root: Path, images: int, seed: int = 0) -> None:
    """images/{train,test}/<class>/<class>_<n>.jpg (about 512 × 384, some portrait) and the
    headerless texts/{train,test}_titles.csv (`image name,text,class`); a quarter is test."""
    rng = np.random.default_rng(seed)
    (root / "texts").mkdir(parents=True, exist_ok=True)
    rows: dict[str, list] = {"train": [], "test": []}
    words = ("easy", "best", "homemade", "classic", "quick", "healthy", "grandma's", "crispy")
    for k in range(images):
        cls = FOODS[k % len(FOODS)]
        split = "test" if (k // len(FOODS)) % 4 == 3 else "train"
        name = f"{cls}_{k}.jpg"
        w, h = int(rng.integers(448, 513)), int(rng.integers(336, 385))
        if rng.random() < 0.2:
            w, h = h, w
        (root / "images" / split / cls).mkdir(parents=True, exist_ok=True)
        save_jpeg(photo_base(rng, w, h), rng, root / "images" / split / cls / name)
        title = f"{rng.choice(words).title()} {cls.replace('_', ' ')} recipe, {rng.choice(words)} #{k}"
        rows[split].append([name, title, cls])
    for split, listed in rows.items():
        with open(root / "texts" / f"{split}_titles.csv", "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows(listed)


def fixture(work: Path, dataset: str, n: int) -> Path:
    """The dataset's fixture folder under `work`, written unless a complete one of `n` is there."""
    root = work / "raw" / dataset
    marker = root / "fixture.json"
    want = {"dataset": dataset, "samples": n, "seconds": WAV_SECONDS, "frames": FRAMES, "format": 1}
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return root
    shutil.rmtree(root, ignore_errors=True)
    (write_cremad if dataset == "cremad" else write_food101)(root, n)
    marker.write_text(json.dumps(want))
    return root


# -- configs and measurements shared by the child processes -----------------------------------


def data_config(dataset: str, root: str, data_dir: str, *overrides: str):
    """The dataset's config (configs/datasets/<dataset>.yaml) on the fixture; overrides last."""
    from mmray.data.sources import DataConfig
    from mmray.train.experiment import load_experiment

    quiet = ["data.progress=false"] if "progress" in {f.name for f in dataclasses.fields(DataConfig)} else []
    return load_experiment(str(ROOT / "configs" / "datasets" / f"{dataset}.yaml"), [
        f"data.root={root}", f"data.data_dir={data_dir}", *quiet, *overrides]).data


def _proc_cpu(pid: str) -> tuple[int, float]:
    """(parent pid, user + system CPU seconds) of a process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_counters() -> tuple[float, float]:
    """(CPU seconds this process and its descendants have used, busy CPU seconds of the whole
    machine): the difference over a measurement is what other processes used."""
    procs = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):  # a process that ended
                procs[int(pid)] = _proc_cpu(pid)
    mine, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, (pp, _) in procs.items() if pp == parent and p not in mine]
        mine.update(kids)
        frontier += kids
    own = sum(procs[p][1] for p in mine if p in procs)
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4] + (values[7] if len(values) > 7 else 0)  # idle, iowait, steal
    return own, (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def other_cores(start: tuple[float, float], end: tuple[float, float], seconds: float) -> float:
    """Cores' worth of CPU that processes outside this one's tree used between two counters."""
    return max(0.0, ((end[1] - start[1]) - (end[0] - start[0])) / max(seconds, 1e-9))


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def column_bytes(version_dir: Path) -> dict[str, int]:
    """Compressed bytes per top-level column over all shards of a version ("_footer": the rest
    of the files: Parquet metadata and headers)."""
    import pyarrow.parquet as pq

    out: dict[str, int] = {}
    total = 0
    for path in sorted(version_dir.rglob("*.parquet")):
        total += path.stat().st_size
        meta = pq.ParquetFile(path).metadata
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                col = group.column(c)
                name = col.path_in_schema.split(".")[0]
                out[name] = out.get(name, 0) + col.total_compressed_size
    out["_footer"] = total - sum(out.values())
    return out


# -- child processes: one measurement each, in a fresh interpreter ----------------------------


_RAY_TMP: list[str] = []  # the Ray temp folder a child started, removed when it ends


def child_preprocess(spec: dict) -> dict:
    """Preprocess the fixture (forced) in a local Ray of RAY_CPUS CPUs, started here unless this
    process runs several (--quick); time the call."""
    import ray

    from mmray.data.preprocess import preprocess
    from mmray.ray_utils import init_ray

    cfg = data_config(spec["dataset"], spec["root"], spec["data_dir"],
                      f"data.parallelism={spec['parallelism']}", *spec["overrides"])
    ray_s = 0.0
    if not ray.is_initialized():
        # A Ray temp folder of its own: with the default one, ray.init joins a cluster that `ray
        # start` left running on this machine (/tmp/ray/ray_current_cluster) instead of starting.
        _RAY_TMP.append(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
        t0 = time.perf_counter()
        init_ray(num_cpus=RAY_CPUS, temp_dir=_RAY_TMP[-1])
        ray_s = time.perf_counter() - t0
    c0, t0 = cpu_counters(), time.perf_counter()
    prepared = preprocess(cfg, force=True)
    seconds = time.perf_counter() - t0
    busy = (cpu_counters()[1] - c0[1]) / seconds
    vdir = prepared.version_dir
    rows = sum(prepared.manifest["rows"].values())
    return {"rows": rows, "split_rows": prepared.manifest["rows"], "seconds": seconds,
            "samples_per_s": rows / seconds, "ray_start_s": ray_s, "busy_cores": busy,
            "version_dir": str(vdir), "encodings": prepared.manifest["params"]["encodings"],
            "shard_bytes": sum(p.stat().st_size for p in vdir.rglob("*.parquet")),
            "column_bytes": column_bytes(vdir)}


def child_featurize(spec: dict) -> dict:
    """The featurizer alone (no Ray), over every sample in batches of data.batch_rows, as one
    preprocessing actor runs it: the work a worker does, without the pipeline around it."""
    from mmray.data.preprocess import Featurizer
    from mmray.data.sources import get_source

    cfg = data_config(spec["dataset"], spec["root"], spec["data_dir"])
    source = get_source(cfg.dataset)
    items = source.items(cfg)
    featurizer = Featurizer(source.spec(cfg).to_dict(), dataclasses.asdict(cfg))
    t0 = time.perf_counter()
    for start in range(0, len(items), cfg.batch_rows):
        chunk = items[start:start + cfg.batch_rows]
        batch = {"id": np.array([i.id for i in chunk], dtype=object),
                 "split": np.array([i.split for i in chunk], dtype=object),
                 "label": np.array([i.label for i in chunk])}
        for m in featurizer.spec.modalities:
            batch[f"file_{m}"] = np.array([i.files.get(m, "") for i in chunk], dtype=object)
            batch[f"inline_{m}"] = np.array([i.inline.get(m, "") for i in chunk], dtype=object)
        out = featurizer(batch)
        if any(out["error"]):
            raise RuntimeError(f"featurizer errors: {[e for e in out['error'] if e][:3]}")
    seconds = time.perf_counter() - t0
    return {"samples": len(items), "seconds": seconds, "samples_per_s": len(items) / seconds}


def raw_dataset(spec: dict):
    """The train split as a map-style Dataset over the raw files: per sample the decode and the
    transforms the shards' reader applies (features.load_image + codec.transform_image with the
    same Augment, features.load_audio + audio_features, features.tokenize)."""
    import torch

    from mmray.data import codec
    from mmray.data import features as F
    from mmray.data.sources import get_source
    from mmray.data.sources.source import frame_files

    cfg = data_config(spec["dataset"], spec["root"], spec["data_dir"], *TRAIN_AUGMENT)
    source = get_source(cfg.dataset)
    items = [it for it in source.items(cfg) if it.split == "train"]
    modalities = source.spec(cfg).modalities

    class RawFiles(torch.utils.data.Dataset):
        def __len__(self):
            return len(items)

        def __getitem__(self, i):
            it, rng = items[i], np.random.default_rng()
            out = {"label": it.label}
            for m, ms in modalities.items():
                if ms.kind == "image":
                    path = it.files[m]
                    files = frame_files(path, cfg.frames) if path.endswith("/") else [path]
                    x = np.concatenate([codec.transform_image(F.load_image(f), cfg.image, cfg.augment, rng)
                                        for f in files])
                elif ms.kind == "audio":
                    a = cfg.audio
                    x = F.audio_features(F.load_audio(it.files[m], a.sample_rate, a.seconds), a)
                else:
                    x = F.tokenize(it.inline[m], cfg.text)
                out[m] = torch.from_numpy(x)
            return out

    return RawFiles()


def child_loader(spec: dict) -> dict:
    """Samples/s of one ingest path on spec["cpus"] CPUs, the first batch untimed."""
    import torch

    cpus = spec["cpus"]
    torch.set_num_threads(cpus)
    if spec["mode"] == "dataloader":
        loader = torch.utils.data.DataLoader(
            raw_dataset(spec), batch_size=spec["batch"], shuffle=True, num_workers=cpus,
            persistent_workers=True, generator=torch.Generator().manual_seed(0))

        def epoch_batches(epoch):
            for b in loader:
                yield len(b["label"])
    else:
        from mmray.data.ingest import Decoder, ParquetRows, SplitReader, TableRows, read_table
        from mmray.data.reader import load_manifest

        vdir = spec["version_dir"]
        cfg = data_config(spec["dataset"], spec["root"], spec["data_dir"], *TRAIN_AUGMENT)
        rows = (TableRows(read_table(vdir, "train")) if spec["mode"] == "cached"
                else ParquetRows(vdir, "train"))
        reader = SplitReader(rows, Decoder(load_manifest(vdir), cfg.augment), "train",
                             batch_size=spec["batch"], seed=0, threads=cpus)

        def epoch_batches(epoch):
            for b in reader.batches(epoch):
                yield len(b["id"])

    t_start = time.perf_counter()
    seen = timed = 0
    first_s = None
    for epoch in range(spec["epochs"]):
        for n in epoch_batches(epoch):
            seen += n
            if first_s is None:  # warm-up: the clock starts once the first batch is out
                first_s = time.perf_counter() - t_start
                c0, t0 = cpu_counters(), time.perf_counter()
            else:
                timed += n
    seconds = time.perf_counter() - t0
    c1 = cpu_counters()
    return {"samples": seen, "timed_samples": timed, "seconds": seconds, "first_batch_s": first_s,
            "samples_per_s": timed / seconds if seconds > 0 else float("nan"),
            # Cores' worth of CPU this process (its threads, a DataLoader's workers) used, and
            # what other processes on the machine used meanwhile.
            "own_cores": (c1[0] - c0[0]) / seconds, "other_cores": other_cores(c0, c1, seconds)}


def child_rss(spec: dict) -> dict:
    """ru_maxrss over one train epoch, streamed (ParquetRows) or cached (TableRows)."""
    import torch

    from mmray.data import ingest
    from mmray.data.reader import load_manifest

    torch.set_num_threads(spec["threads"])
    vdir = spec["version_dir"]
    manifest = load_manifest(vdir)
    codecs = {e["codec"] for e in manifest["params"]["encodings"].values()}
    # Train augmentation where the shards allow it (float32 images cannot be cropped).
    cfg = data_config(spec["dataset"], spec["root"], spec["data_dir"],
                      *(TRAIN_AUGMENT if codecs & {"jpeg", "uint8"} else NO_AUGMENT))
    decoder = ingest.Decoder(manifest, cfg.augment)
    rss_start, peak_start = rss_mb(), peak_rss_mb()
    rows = (ingest.TableRows(ingest.read_table(vdir, "train")) if spec["mode"] == "cached"
            else ingest.ParquetRows(vdir, "train"))
    reader = ingest.SplitReader(rows, decoder, "train", batch_size=spec["batch"], seed=0,
                                threads=spec["threads"])
    n = batch_bytes = 0
    for batch in reader.batches(0):
        n += len(batch["id"])
        batch_bytes = max(batch_bytes, sum(x.numel() * x.element_size() for x in batch["inputs"].values()))
    return {"rss_start_mb": rss_start, "peak_before_mb": peak_start, "peak_mb": peak_rss_mb(),
            "samples": n, "split_bytes": ingest.split_bytes(vdir, "train"), "batch_bytes": batch_bytes,
            "threads": spec["threads"]}


CHILDREN = {"preprocess": child_preprocess, "featurize": child_featurize, "loader": child_loader,
            "rss": child_rss}


def child_main(task: str, specs: list[dict], out: str) -> int:
    """Run `specs` of `task` in this process, one after the other; write their results to `out`."""
    cpus = sorted(os.sched_getaffinity(0))
    results = []
    try:
        for spec in specs:
            if "cpus" in spec:  # before torch starts its thread pools, so they see only these
                os.sched_setaffinity(0, set(cpus[: spec["cpus"]]))
                os.environ["OMP_NUM_THREADS"] = str(spec["cpus"])
            results.append(CHILDREN[task](spec))
    finally:
        if _RAY_TMP:
            import ray

            ray.shutdown()
            shutil.rmtree(_RAY_TMP[0], ignore_errors=True)
    Path(out).write_text(json.dumps(results))
    return 0


def run_children(work: Path, task: str, specs: dict[str, dict], together: bool) -> dict[str, dict]:
    """Each of `specs` ({label: spec}) in a fresh Python process, or, `together`, all in one
    (--quick: fewer starts; figures then not comparable). Output is kept in <work>/logs/."""
    groups = [(task, list(specs))] if together else [(label, [label]) for label in specs]
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
    results = {}
    for name, labels in groups:
        out, log_path = logs / f"{name}.json", logs / f"{name}.log"
        out.unlink(missing_ok=True)
        t0 = time.perf_counter()
        with open(log_path, "w") as log:
            proc = subprocess.run([sys.executable, __file__, "--child", task,
                                   json.dumps([specs[k] for k in labels]), str(out)],
                                  cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"{name} failed (exit {proc.returncode}), log {log_path}:\n"
                               f"{log_path.read_text()[-3000:]}")
        print(f"  {name}: {time.perf_counter() - t0:.1f} s", flush=True)
        results.update(zip(labels, json.loads(out.read_text())))
    return results


# -- raw sizes --------------------------------------------------------------------------------


def raw_bytes(dataset: str, root: Path, data_dir: Path) -> dict:
    """Bytes of the input files each sample reads (CREMA-D: the WAV and the frames used;
    Food-101: the image, and the title CSVs shared out), per sample and per modality."""
    from mmray.data.sources import get_source
    from mmray.data.sources.source import frame_files

    cfg = data_config(dataset, str(root), str(data_dir))
    items = get_source(dataset).items(cfg)
    per: dict[str, int] = {}
    for it in items:
        for m, path in it.files.items():
            files = frame_files(path, cfg.frames) if path.endswith("/") else [Path(path)]
            per[m] = per.get(m, 0) + sum(f.stat().st_size for f in files)
    if dataset == "food101":
        per["text"] = sum(p.stat().st_size for p in (root / "texts").glob("*.csv"))
    return {"samples": len(items), "total": sum(per.values()), "per_modality": per}


# -- the report -------------------------------------------------------------------------------


def _kb(n: float) -> str:
    return f"{n / 1024:,.1f} KB"


def _gb(n: float) -> str:
    return f"{n / 1e9:,.2f} GB"


def _goal(ok: bool) -> str:
    return "met" if ok else "**not met**"


def extrapolate(dataset: str, raw: dict, shard: dict) -> dict:
    """Full-dataset bytes from the fixture's per-sample bytes. CREMA-D: real clips are about
    REAL_CREMAD_SECONDS long, so the raw WAV and the (unpadded) pcm16 audio column scale by
    REAL_CREMAD_SECONDS / WAV_SECONDS; float32 audio features are padded to 5 s either way."""
    n_fix, full = raw["samples"], FULL[dataset]
    raw_per = raw["total"] / n_fix
    shard_per = shard["shard_bytes"] / shard["rows"]
    if dataset == "cremad":
        scale = REAL_CREMAD_SECONDS / WAV_SECONDS
        wav = raw["per_modality"]["audio"] / n_fix
        raw_per -= wav - (44 + (wav - 44) * scale)  # header + PCM
        if shard["encodings"]["audio"]["codec"] == "pcm16":
            shard_per -= shard["column_bytes"]["audio"] / shard["rows"] * (1 - scale)
    return {"samples": full, "raw_per_sample": raw_per, "shard_per_sample": shard_per,
            "raw_bytes": raw_per * full, "shard_bytes": shard_per * full, "ratio": shard_per / raw_per}


def markdown(r: dict) -> str:
    lines = (["**--quick**: tiny fixtures, and every measurement of a kind in one process: the "
              "figures only show that the benchmark runs.", ""] if r["quick"] else [])
    lines += [f"Fixtures: CREMA-D {r['fixtures']['cremad']} and UPMC Food-101 {r['fixtures']['food101']} "
             f"(JPEG quality {QUALITY}); batch {r['batch']}, {r['epochs']} epoch(s); "
             f"{r['cpus_on_machine']} CPUs on the machine.", "",
             "**Shard size** (shard bytes per sample ÷ raw bytes per sample, goal ≤ 1.5)", "",
             "| dataset | encoding | raw / sample | shard / sample | ratio | goal | per column / sample |",
             "|---|---|---|---|---|---|---|"]
    for ds in ("cremad", "food101"):
        for enc, s in r["size"][ds].items():
            cols = ", ".join(f"{k} {_kb(v)}" for k, v in s["columns_per_sample"].items())
            lines.append(f"| {ds} | {enc} ({s['codecs']}) | {_kb(s['raw_per_sample'])} | "
                         f"{_kb(s['shard_per_sample'])} | {s['ratio']:.2f}× | {_goal(s['ratio'] <= 1.5)} "
                         f"| {cols} |")
    lines += ["", "**Full datasets, extrapolated** from the fixtures' per-sample bytes (CREMA-D: "
              f"{FULL['cremad']:,} clips of ~{REAL_CREMAD_SECONDS} s, i.e. the fixture's 5 s WAV and pcm16 "
              f"audio column scaled by {REAL_CREMAD_SECONDS}/5, plus 3 frames at the fixture's JPEG size; "
              f"Food-101: {FULL['food101']:,} images at the fixture's per-image bytes)", "",
              "| dataset | encoding | raw / sample assumed | raw total | shards total | ratio |",
              "|---|---|---|---|---|---|"]
    for ds in ("cremad", "food101"):
        for enc, s in r["size"][ds].items():
            e = s["full"]
            lines.append(f"| {ds} ({e['samples']:,}) | {enc} | {_kb(e['raw_per_sample'])} | "
                         f"{_gb(e['raw_bytes'])} | {_gb(e['shard_bytes'])} | {e['ratio']:.2f}× |")
    lines += ["", "**Samples/s delivered to the training loop** (decode + random_resized_crop + flip; "
              "goal: mmray cached ≥ 1.0 × DataLoader)", "",
              "| dataset | CPUs | mmray cached | mmray streamed | DataLoader | cached ÷ DataLoader | goal "
              "| streamed ÷ DataLoader | cores used: cached / streamed / DataLoader | other processes' "
              "cores, same order |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for ds in ("cremad", "food101"):
        for cpus, t in r["throughput"][ds].items():
            ratio, sratio = t["cached_over_dataloader"], t["streamed_over_dataloader"]
            own, other = (" / ".join(f"{t[m][k]:.2f}" for m in ("cached", "streamed", "dataloader"))
                          for k in ("own_cores", "other_cores"))
            lines.append(f"| {ds} | {cpus} | {t['cached']['samples_per_s']:.1f} | "
                         f"{t['streamed']['samples_per_s']:.1f} | {t['dataloader']['samples_per_s']:.1f} | "
                         f"{ratio:.2f}× | {_goal(ratio >= 1.0)} | {sratio:.2f}× | {own} | {other} |")
    lines += ["", f"**Preprocessing** (forced, fresh local Ray of {RAY_CPUS} CPUs per run; only the "
              "preprocess call timed; goal ≥ 1.6× from 1 to 2 workers)", "",
              "| dataset | encoding | 1 worker | 2 workers | 2 ÷ 1 | goal | Ray start-up, 1 / 2 workers "
              "(not timed) | busy cores (whole machine), 1 / 2 workers | featurizer alone: 1 CPU, no Ray |",
              "|---|---|---|---|---|---|---|---|---|"]
    for ds in ("cremad", "food101"):
        p = r["preprocess"][ds]
        one, two, old, alone = p["1"], p["2"], p["float32"], p["featurizer_alone"]
        if one:
            first = (f"{one['samples_per_s']:.1f} samples/s ({one['seconds']:.1f} s)", f"{p['ratio']:.2f}×",
                     _goal(p["ratio"] >= 1.6), f"{one['ray_start_s']:.1f} s", f"{one['busy_cores']:.2f}")
        else:  # --quick
            first = ("not run",) + ("–",) * 4
        lines.append(f"| {ds} | default | {first[0]} | {two['samples_per_s']:.1f} samples/s "
                     f"({two['seconds']:.1f} s) | {first[1]} | {first[2]} | {first[3]} / "
                     f"{two['ray_start_s']:.1f} s | {first[4]} / {two['busy_cores']:.2f} | "
                     f"{alone['samples_per_s']:.1f} samples/s ({alone['seconds']:.1f} s) |")
        lines.append(f"| {ds} | float32 | – | {old['samples_per_s']:.1f} samples/s "
                     f"({old['seconds']:.1f} s) | – | – | – / {old['ray_start_s']:.1f} s | "
                     f"– / {old['busy_cores']:.2f} | – |")
    lines += ["", "**Peak resident memory of one train epoch** (fresh process each; RSS before = "
              "after the imports, before the rows are opened; peak = ru_maxrss; the reader decodes up "
              "to 2 × threads batches ahead of the one the loop holds)", "",
              "| dataset | encoding | reader | RSS before | peak RSS | peak − before | train split "
              "shards | largest decoded batch |",
              "|---|---|---|---|---|---|---|---|"]
    for ds in ("cremad", "food101"):
        for enc, modes in r["memory"][ds].items():
            for mode, m in modes.items():
                lines.append(f"| {ds} | {enc} | {mode} ({m['threads']} threads) | "
                             f"{m['rss_start_mb']:.0f} MB | "
                             f"{m['peak_mb']:.0f} MB | {m['peak_mb'] - m['rss_start_mb']:.0f} MB | "
                             f"{m['split_bytes'] / 2**20:.0f} MB | {m['batch_bytes'] / 2**20:.0f} MB |")
    return "\n".join(lines) + "\n"


# -- main -------------------------------------------------------------------------------------


def run(work: Path, args) -> dict:
    counts = {"cremad": args.clips, "food101": args.images}
    print("writing fixtures", flush=True)
    roots = {ds: fixture(work, ds, n) for ds, n in counts.items()}
    fixtures = {}
    for ds, root in roots.items():
        jpgs = sorted(root.rglob("*.jpg"))
        fixtures[ds] = (f"{counts[ds]} {'clips' if ds == 'cremad' else 'images'}, mean JPEG "
                        f"{_kb(np.mean([p.stat().st_size for p in jpgs]))}")
        fixtures[ds] += (f" ({FRAMES} frames of {FRAME_SIDE} px per clip, {WAV_SECONDS:g} s WAVs)"
                         if ds == "cremad" else " (about 512 × 384)")
    result: dict = {"quick": args.quick, "fixtures": fixtures, "batch": args.batch,
                    "epochs": args.epochs, "cpus_on_machine": os.cpu_count(), "size": {},
                    "preprocess": {}, "throughput": {}, "memory": {}}
    together = args.quick
    shards = {"default": work / "shards-p2", "float32": work / "shards-float32"}

    print("preprocessing", flush=True)
    specs = {}
    workers_tried = (2,) if args.quick else (1, 2)  # --quick: one Ray start costs less
    for ds, root in roots.items():
        for workers in workers_tried:
            specs[f"preprocess-{ds}-p{workers}"] = {
                "dataset": ds, "root": str(root), "data_dir": str(work / f"shards-p{workers}"),
                "parallelism": workers, "overrides": []}
        specs[f"preprocess-{ds}-float32"] = {"dataset": ds, "root": str(root),
                                             "data_dir": str(shards["float32"]), "parallelism": 2,
                                             "overrides": OLD_ENCODING}
    pre = run_children(work, "preprocess", specs, together)
    alone = run_children(work, "featurize", {
        f"featurize-{ds}": {"dataset": ds, "root": str(root), "data_dir": str(work / "shards-p1"),
                            "cpus": 1} for ds, root in roots.items()}, together)
    versions = {}
    for ds, root in roots.items():
        one, two, old = (pre.get(f"preprocess-{ds}-{k}") for k in ("p1", "p2", "float32"))
        result["preprocess"][ds] = {"1": one, "2": two, "float32": old,
                                    "ratio": two["samples_per_s"] / one["samples_per_s"] if one else None,
                                    "featurizer_alone": alone[f"featurize-{ds}"]}
        versions[ds] = {"default": two["version_dir"], "float32": old["version_dir"]}
        raw = raw_bytes(ds, root, shards["default"])
        raw_per = raw["total"] / raw["samples"]
        result["size"][ds] = {}
        for enc, s in (("default", two), ("float32", old)):
            per = s["shard_bytes"] / s["rows"]
            result["size"][ds][enc] = {
                "codecs": ", ".join(f"{m} {e['codec']}" for m, e in s["encodings"].items()),
                "raw_per_sample": raw_per, "shard_per_sample": per, "ratio": per / raw_per, "raw": raw,
                "columns_per_sample": {k: v / s["rows"] for k, v in s["column_bytes"].items()
                                       if k not in ("id", "label")},
                "full": extrapolate(ds, raw, s)}

    print("samples/s", flush=True)
    specs = {}
    for ds, root in roots.items():
        for cpus in (1, 2):
            for mode in ("cached", "streamed", "dataloader"):
                specs[f"loader-{ds}-{mode}-{cpus}cpu"] = {
                    "dataset": ds, "root": str(root), "data_dir": str(shards["default"]),
                    "version_dir": versions[ds]["default"], "mode": mode, "cpus": cpus,
                    "batch": args.batch, "epochs": args.epochs}
    loaders = run_children(work, "loader", specs, together)
    for ds in roots:
        result["throughput"][ds] = {}
        for cpus in (1, 2):
            t = {mode: loaders[f"loader-{ds}-{mode}-{cpus}cpu"]
                 for mode in ("cached", "streamed", "dataloader")}
            t["cached_over_dataloader"] = t["cached"]["samples_per_s"] / t["dataloader"]["samples_per_s"]
            t["streamed_over_dataloader"] = t["streamed"]["samples_per_s"] / t["dataloader"]["samples_per_s"]
            result["throughput"][ds][str(cpus)] = t

    print("memory", flush=True)
    specs = {f"rss-{ds}-{enc}-{mode}": {"dataset": ds, "root": str(root), "data_dir": str(shards[enc]),
                                        "version_dir": versions[ds][enc], "mode": mode,
                                        "threads": RAY_CPUS, "batch": args.batch}
             for ds, root in roots.items() for enc in ("default", "float32")
             for mode in ("streamed", "cached")}
    rss = run_children(work, "rss", specs, together)
    for ds in roots:
        result["memory"][ds] = {enc: {mode: rss[f"rss-{ds}-{enc}-{mode}"] for mode in ("streamed", "cached")}
                                for enc in ("default", "float32")}
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:  # a measurement process started by run_child
        return child_main(argv[1], json.loads(argv[2]), argv[3])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=300, help="CREMA-D fixture clips")
    p.add_argument("--images", type=int, default=300, help="Food-101 fixture images")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2, help="epochs per samples/s measurement")
    p.add_argument("--work", help="folder for the fixtures, shards and logs (kept); default: a "
                   "temporary folder, removed at the end")
    p.add_argument("--quick", action="store_true", help="a tiny run (24 samples each, batch 8, "
                   "1 epoch) to check that the benchmark works")
    p.add_argument("--out", help="where ingest.json and ingest.md go; default bench/results "
                   "(with --quick: nowhere, the table is only printed)")
    args = p.parse_args(argv)
    if args.quick:
        args.clips, args.images, args.batch, args.epochs = 24, 24, 8, 1

    from common import write_results

    t0 = time.perf_counter()
    if args.work:
        work = Path(args.work).resolve()
        work.mkdir(parents=True, exist_ok=True)
        result = run(work, args)
    else:
        with tempfile.TemporaryDirectory(prefix="mmray-bench-ingest-") as tmp:
            result = run(Path(tmp), args)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    md = markdown(result)
    if args.out or not args.quick:
        write_results(args.out or "bench/results", "ingest", result, md)
    else:
        print(md)
    print(f"wall time {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
