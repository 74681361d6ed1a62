import { describe, expect, it } from "vitest";
import { call } from "../helpers/api";

// What the page itself promises; `npm run test:docs` loads it in a real browser (scripts/docs-test.mjs).
describe("/docs", () => {
  it("loads nothing from another origin: same-origin scripts, a CSP that says so, Scalar's outside calls off", async () => {
    const res = await call("GET", "/docs");
    expect(res.status).toBe(200);
    const csp = res.headers.get("content-security-policy") ?? "";
    expect(csp).toContain("default-src 'self'");
    expect(csp).toContain("script-src 'self'");
    expect(csp).toContain("font-src 'self' data:");
    const sources = [...res.text.matchAll(/\b(?:src|href)="([^"]*)"/g)].map((m) => m[1]);
    expect(sources).toEqual(["data:,", "/docs/scalar/standalone.js", "/docs/boot.js"]);
    const config = JSON.parse(/<script type="application\/json" id="scalar-config">(.*?)<\/script>/s.exec(res.text)![1]!);
    expect(config).toMatchObject({ url: "/openapi.json", withDefaultFonts: false, telemetry: false, proxyUrl: "" });
  });
});
