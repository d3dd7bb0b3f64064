// Bundles the dashboard (src/app.js and the CSS it imports) into the Python package's static dir, which the
// server serves at /dashboard/static. scripts/build-dashboard.sh runs it (from scripts/setup.sh).
import * as esbuild from "esbuild";
import { fileURLToPath } from "node:url";
import path from "node:path";

const here = path.dirname(fileURLToPath(import.meta.url));
await esbuild.build({
  entryPoints: [path.join(here, "src", "app.js")],
  outdir: path.join(here, "..", "src", "sandboxd", "dashboard", "static"),
  entryNames: "app",
  bundle: true,
  minify: true,
  format: "iife",
  target: ["es2020"],
  legalComments: "linked",
  logLevel: "warning",
});
