// npm run token -- 42      a user token for user 42
// npm run token -- admin   an admin token
import { ensureDevVars, readDevVars, tokenFor } from "./local.mjs";

const who = process.argv[2];
if (!who) {
  console.error("usage: npm run token -- <userId|admin>");
  process.exit(2);
}
ensureDevVars();
try {
  console.log(await tokenFor(readDevVars().JWT_SECRET, who));
} catch (error) {
  console.error(error.message);
  process.exit(2);
}
