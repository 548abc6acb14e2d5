"""Reward plug-ins named by tests as ``tests.plugins:NAME``."""

import math

not_callable = 3.0


def brightness(images, prompts):
    import numpy as np

    return [float(np.asarray(img.convert("L"), dtype=np.float32).mean()) / 255.0 for img in images]


def wrong_count(outputs, prompts):
    return [1.0] * (len(outputs) + 1)


def strings(outputs, prompts):
    return ["good"] * len(outputs)


def all_nan(outputs, prompts):
    return [math.nan] * len(outputs)


def raises(outputs, prompts):
    raise RuntimeError("the scoring service is down")


def brightness_with_marker(images, prompts):
    """Brightness, announcing each call with a marker file so a test can kill the run while scoring."""
    import os
    import time
    from pathlib import Path

    folder = Path(os.environ["RAFT_TEST_MARKERS"])
    calls = len(list(folder.glob("score-*")))
    (folder / f"score-{calls:03d}").touch()
    time.sleep(0.3)
    return brightness(images, prompts)


def good_count_with_marker(texts, prompts):
    """How often a response says "good", announcing each call with a marker file (see above)."""
    import os
    import time
    from pathlib import Path

    folder = Path(os.environ["RAFT_TEST_MARKERS"])
    calls = len(list(folder.glob("score-*")))
    (folder / f"score-{calls:03d}").touch()
    time.sleep(0.3)
    return [float(t.split().count("good")) for t in texts]


def prompt_and_output(outputs, prompts):
    """Depends on both the prompt and the output, images (brightness) or texts (length); fails on "boom"."""
    if "boom" in prompts:
        raise RuntimeError("boom was asked for")
    values = brightness(outputs, prompts) if outputs and not isinstance(outputs[0], str) else [len(o) for o in outputs]
    return [len(p) + v for p, v in zip(prompts, values)]


def interrupt(outputs, prompts):
    """Brightness, after a SIGINT to this process (as Ctrl-C sends): the run stops resumable."""
    import os
    import signal

    os.kill(os.getpid(), signal.SIGINT)
    return brightness(outputs, prompts)
