import type { D1Migration } from "cloudflare:test";

declare global {
  namespace Cloudflare {
    interface Env {
      TEST_MIGRATIONS: D1Migration[];
      /** wrangler.toml's WRITE_RATE_LIMITER as deployed (vitest.config.ts gives the Worker's own a higher limit). */
      WRITE_RATE_LIMITER_AS_DEPLOYED: RateLimit;
    }
  }
}
