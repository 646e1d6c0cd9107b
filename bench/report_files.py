"""How the benchmarks write a report: ``<stem>.json`` (the data, for tools and plots) beside
``<stem>.md`` (the table a person reads), into a folder made as needed."""

import json
import os


def write_json_and_markdown(out_dir: str, stem: str, data: dict, markdown: str) -> None:
    """Write ``data`` as ``out_dir/<stem>.json`` (indented) and ``markdown`` as
    ``out_dir/<stem>.md``, creating ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, stem + ".json"), "w") as f:
        json.dump(data, f, indent=1)
    with open(os.path.join(out_dir, stem + ".md"), "w") as f:
        f.write(markdown)
