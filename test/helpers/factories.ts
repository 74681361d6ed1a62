import { adminToken, call } from "./api";

let serial = 0;
const unique = (prefix: string) => `${prefix}-${++serial}-${crypto.randomUUID().slice(0, 8)}`;

export async function makeUser(name = unique("user")): Promise<{ id: number; name: string; balance: number }> {
  const res = await call("POST", "/api/admin/users", { token: await adminToken(), body: { name } });
  if (res.status !== 201) throw new Error(`makeUser failed: ${res.status} ${res.text}`);
  return res.body;
}

export async function makeProduct(
  fields: { name?: string; price?: number; stock?: number } = {},
): Promise<{ id: number; name: string; price: number; stock: number; createdAt: string; updatedAt: string }> {
  const body = { name: fields.name ?? unique("product"), price: fields.price ?? 1000, stock: fields.stock ?? 10 };
  const res = await call("POST", "/api/admin/products", { token: await adminToken(), body });
  if (res.status !== 201) throw new Error(`makeProduct failed: ${res.status} ${res.text}`);
  return res.body;
}
