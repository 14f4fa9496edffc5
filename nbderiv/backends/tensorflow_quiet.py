r"""TensorFlow's C++ log lines, kept out of the user's notebook during nbderiv's calls.

Imports nothing from TensorFlow (it wraps TensorFlow's own import).

>>> import os
>>> with quiet_tf_logs():
...     _ = os.write(2, b"I0000 00:00:1.0  123 port.cc:153] oneDNN notice\n")
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile

# TensorFlow's C++ log lines ("I0000 00:00:... port.cc:153] oneDNN custom operations ...",
# "W0000 ... util.cc:163] Not handling type DT_DOUBLE") and absl's preamble.
_TF_LOG_LINE = re.compile(r"^([IWEF]\d{4} [\d:.]+\s+\d+ \S+:\d+\] |"
                          r"WARNING: All log messages before absl::InitializeLog|"
                          r"To enable the following instructions: )")


@contextlib.contextmanager
def quiet_tf_logs():
    """Drop TensorFlow's C++ log lines written to file descriptor 2 meanwhile (start-up
    notices, graph-optimizer remarks); any other output is passed on afterwards. No logging
    setting or environment variable is changed."""
    try:
        saved = os.dup(2)
    except OSError:  # no usable fd 2 (some embedded interpreters): nothing to filter
        yield
        return
    sink = tempfile.TemporaryFile()
    python_err = io.StringIO()
    try:
        os.dup2(sink.fileno(), 2)
        with contextlib.redirect_stderr(python_err):
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        sink.seek(0)
        text = sink.read().decode("utf-8", "replace")
        sink.close()
        kept = "".join(line for line in text.splitlines(keepends=True)
                       if not _TF_LOG_LINE.match(line))
        if kept:
            os.write(2, kept.encode())
        if python_err.getvalue():
            sys.stderr.write(python_err.getvalue())
