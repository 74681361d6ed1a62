// Copies the standalone browser bundle of @scalar/api-reference (a pinned devDependency) into the Worker's
// static assets, where the /docs page loads it from the Worker's own origin. Run by `npm start`, `npm run
// build` and `npm run test:docs`; the copy is git-ignored. Copies only when the bundle changed.
import { copyFileSync, existsSync, mkdirSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const pkg = join(root, "node_modules", "@scalar", "api-reference");
const source = join(pkg, "dist", "browser", "standalone.js");
export const BUNDLE = join(root, "public", "docs", "scalar", "standalone.js");

/** Copies the bundle if the copy is missing or differs; returns the package version. */
export function copyDocsAssets() {
  if (!existsSync(source)) throw new Error(`${source} is missing: run npm install (@scalar/api-reference is a devDependency)`);
  const { version } = JSON.parse(readFileSync(join(pkg, "package.json"), "utf8"));
  const bundle = readFileSync(source);
  if (!existsSync(BUNDLE) || !readFileSync(BUNDLE).equals(bundle)) {
    mkdirSync(dirname(BUNDLE), { recursive: true });
    copyFileSync(source, BUNDLE);
  }
  return version;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const version = copyDocsAssets();
  console.log(`docs: @scalar/api-reference ${version} → public/docs/scalar/standalone.js`);
}
