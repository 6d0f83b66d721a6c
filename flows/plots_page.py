"""The page `dvc plots show` fills, with Vega, Vega-Lite and Vega-Embed inline, so the plots render offline.

DVC's own page loads the three libraries from a CDN (dvc_render/vega.py), so on a machine without internet
every plot is blank. `.dvc/config` points `plots.html_template` at `.dvc/plots/page.html`, which carries
the libraries in one `<script>` and leaves out DVC's `{scripts}` placeholder (the CDN tags). The page is
committed, so `dvc plots show` works on a fresh clone without Kiln installed; regenerate it after
upgrading `vl-convert-python` (a dev dependency that bundles the libraries):

    python -m flows.plots_page          # writes .dvc/plots/page.html
"""

from __future__ import annotations

import argparse
from pathlib import Path

# DVC's plot templates declare Vega-Lite v5 ("$schema": .../vega-lite/v5.json): the newest 5.x that
# vl-convert bundles, not its default 6.x.
VEGA_LITE = "5.21"
PAGE = Path(".dvc/plots/page.html")

TEMPLATE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- Vega {vega}, Vega-Lite {vega_lite}, Vega-Embed {vega_embed}, bundled by vl-convert {vl_convert}:
         no request leaves the page (flows/plots_page.py) -->
    <script>{bundle}</script>
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def page_html() -> str:
    import vl_convert

    bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE)
    if "</script" in bundle:  # would end the inline script early
        raise ValueError("the Vega bundle contains '</script'; it cannot be inlined")
    # DVC's placeholders stay literal: format only the ones named here, and escape the stylesheet's braces.
    return TEMPLATE.format(
        refresh_tag="{refresh_tag}",
        plot_divs="{plot_divs}",
        bundle=bundle,
        vega=vl_convert.get_vega_version(),
        vega_lite=VEGA_LITE,
        vega_embed=vl_convert.get_vega_embed_version(),
        vl_convert=vl_convert.__version__,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=PAGE)
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(page_html(), encoding="utf-8")
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
