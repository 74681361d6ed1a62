import path from "node:path";
import { cloudflareTest, readD1Migrations } from "@cloudflare/vitest-plugin";
import { unstable_readConfig } from "wrangler";
import { defineConfig } from "vitest/config";

// The rate limit as deployed (wrangler.toml), for the tests of the limit itself.
const [writeLimit] = unstable_readConfig({ config: "./wrangler.toml" }).ratelimits;

export default defineConfig(async () => {
  const migrations = await readD1Migrations(path.join(import.meta.dirname, "migrations"));
  return {
    plugins: [
      cloudflareTest({
        wrangler: { configPath: "./wrangler.toml" },
        miniflare: {
          bindings: {
            TEST_MIGRATIONS: migrations,
            JWT_SECRET: "test-secret-not-for-production",
            DATA_PLATFORM_URL: "http://127.0.0.1:9/orders",
            // whsec_ and the base64 of the 32 bytes 0x00..0x1f.
            EXPORT_SIGNING_SECRET: "whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
          },
          ratelimits: {
            // Tests fire many writes from one user (storms, idempotency races) to test other things: the Worker's
            // limiter gets room for them. test/integration/rate-limit.test.ts swaps in the deployed limit.
            [writeLimit!.name]: { namespace_id: "9001", simple: { limit: 1_000_000, period: 10 } },
            WRITE_RATE_LIMITER_AS_DEPLOYED: { namespace_id: writeLimit!.namespace_id, simple: writeLimit!.simple },
          },
        },
      }),
    ],
    test: {
      setupFiles: ["./test/helpers/apply-migrations.ts"],
      include: ["test/**/*.test.ts"],
      testTimeout: 30_000,
    },
  };
});
