// Seeds what the scenarios need through the admin API, the way an operator would, and mints user tokens
// locally with the dev secret.
import { tokenFor } from "../scripts/local.mjs";

const SEED_PARALLELISM = 50;
export const MAX_CHARGE = 1_000_000;

/** Runs `fn` over `items` with at most `limit` in flight; results keep the items' order. */
export async function mapLimit(items, limit, fn) {
  const results = new Array(items.length);
  let next = 0;
  const worker = async () => {
    while (next < items.length) {
      const i = next++;
      results[i] = await fn(items[i], i);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return results;
}

// Node's fetch names the real cause (a reset, a refused connection) only in `cause`.
async function fetchOnce(url, init) {
  try {
    return await fetch(url, init);
  } catch (error) {
    throw new Error(`${init.method} ${url}: ${error.cause?.message ?? error.message}`, { cause: error });
  }
}

export async function createApi(baseUrl, secret) {
  const adminToken = await tokenFor(secret, "admin");

  async function call(method, path, { token = adminToken, body } = {}) {
    const res = await fetchOnce(`${baseUrl}${path}`, {
      method,
      headers: {
        authorization: `Bearer ${token}`,
        ...(body === undefined ? {} : { "content-type": "application/json" }),
      },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await res.text();
    return { status: res.status, body: text ? JSON.parse(text) : null };
  }

  /** An admin call that must succeed. */
  async function admin(method, path, body) {
    const res = await call(method, path, { body });
    if (res.status >= 300) throw new Error(`${method} ${path} → ${res.status} ${JSON.stringify(res.body)}`);
    return res.body;
  }

  return {
    call,
    admin,
    adminToken,
    createProduct: (name, price, stock, extra = {}) => admin("POST", "/api/admin/products", { name, price, stock, ...extra }),
    createCoupon: (name, totalQuantity) =>
      admin("POST", "/api/admin/coupons", {
        name,
        discountType: "FIXED",
        discountValue: 1_000,
        totalQuantity,
        validDays: 7,
      }),
    getCoupon: (id) => admin("GET", `/api/admin/coupons/${id}`),
    getProduct: (id) => admin("GET", `/api/products/${id}`),
    /** Charges each user `amount` (in charges of at most MAX_CHARGE); returns each user's balance after. */
    async fund(users, amount) {
      const balances = await mapLimit(users, SEED_PARALLELISM, async (user) => {
        let balance;
        for (let left = amount; left > 0; left -= MAX_CHARGE) {
          const charged = await admin("POST", "/api/balance/charge", {
            userId: user.id,
            amount: Math.min(left, MAX_CHARGE),
          });
          balance = charged.balance;
        }
        return [user.id, balance];
      });
      return new Map(balances);
    },
  };
}

/**
 * Users shared by the scenarios, created on demand with bounded parallelism, each with their own token.
 * `take` hands out the first users for scenarios that leave balances alone; `reserve` hands out users no
 * other scenario has reserved, so each money-moving scenario can check every balance it touched exactly.
 */
export function createUserPool(api, secret) {
  const users = [];
  let reserved = 0;

  async function ensure(count) {
    const missing = count - users.length;
    if (missing <= 0) return;
    const made = await mapLimit(Array.from({ length: missing }), SEED_PARALLELISM, async (_, i) => {
      const { id } = await api.admin("POST", "/api/admin/users", { name: `bench user ${users.length + i + 1}` });
      return { id, token: await tokenFor(secret, id) };
    });
    users.push(...made);
  }

  return {
    async take(count) {
      await ensure(count);
      return users.slice(0, count);
    },
    async reserve(count) {
      await ensure(reserved + count);
      reserved += count;
      return users.slice(reserved - count, reserved);
    },
  };
}

/** Every scenario runs 100 requests in flight. */
export const CONCURRENCY = 100;

/** What a scenario's run() gets: the server's address, an admin client, the pool of users, the sizes. */
export async function scenarioContext(server, secret, sizes) {
  const api = await createApi(server.baseUrl, secret);
  return {
    baseUrl: server.baseUrl,
    api,
    pool: createUserPool(api, secret),
    sizes,
    concurrency: CONCURRENCY,
    tokenFor: (id) => tokenFor(secret, id),
    logCount: server.logCount,
  };
}
