import { Hono } from "hono";
import type { AppEnv } from "./env";

// GET /docs: the interactive API reference, served entirely from this Worker's origin so it works offline
// and behind a strict firewall. The page is written here; Scalar's standalone bundle (@scalar/api-reference,
// pinned, copied into public/docs/scalar/ by scripts/docs-assets.mjs) and public/docs/boot.js are static
// assets. Scalar would otherwise reach other origins: its default fonts (fonts.scalar.com), telemetry, and
// its request proxy for "try it" (proxy.scalar.com); the configuration turns each off, and the page's CSP
// refuses anything that is not same-origin should a newer bundle add one. `npm run test:docs` loads the
// page in headless Chromium with every other origin unreachable and checks that the operations render.

const SCALAR_CONFIGURATION = {
  url: "/openapi.json",
  withDefaultFonts: false,
  telemetry: false,
  proxyUrl: "",
  // 21 operations: every one listed at once reads better than one tag at a time.
  defaultOpenAllTags: true,
};

// Styles: Scalar injects its stylesheet as an inline <style>; everything else must come from 'self'.
const CONTENT_SECURITY_POLICY = [
  "default-src 'self'",
  "script-src 'self'",
  "style-src 'self' 'unsafe-inline'",
  "img-src 'self' data: blob:",
  "font-src 'self' data:",
  "connect-src 'self'",
  "worker-src 'self' blob:",
  "object-src 'none'",
  "base-uri 'none'",
  "form-action 'self'",
  "frame-ancestors 'none'",
].join("; ");

const escapeJsonForHtml = (value: unknown) => JSON.stringify(value).replace(/</g, "\\u003c");

const PAGE = `<!doctype html>
<html lang="en">
  <head>
    <meta charset="utf-8" />
    <meta name="viewport" content="width=device-width, initial-scale=1" />
    <title>Edge Shop API</title>
    <link rel="icon" href="data:," />
  </head>
  <body>
    <div id="app"></div>
    <script type="application/json" id="scalar-config">${escapeJsonForHtml(SCALAR_CONFIGURATION)}</script>
    <script src="/docs/scalar/standalone.js"></script>
    <script src="/docs/boot.js"></script>
  </body>
</html>
`;

export const docsRoutes = new Hono<AppEnv>().get("/docs", (c) => {
  c.header("Content-Security-Policy", CONTENT_SECURITY_POLICY);
  return c.html(PAGE);
});
