// Fault injection from the tests: the Worker, its objects and the tests share one isolate and one `env`,
// so replacing a binding's method here changes what the code under test sees, and nothing in `src/`
// needs a test seam. Always restore (the returned function) in a `finally`.

type Method<T> = { [K in keyof T]: T[K] extends (...args: any[]) => any ? K : never }[keyof T];

/** Replaces `target[method]` with `replace(original)` until the returned function is called. */
export function inject<T extends object, K extends Method<T>>(
  target: T,
  method: K,
  replace: (original: T[K]) => T[K],
): () => void {
  const own = Object.getOwnPropertyDescriptor(target, method);
  const original = (target[method] as (...args: unknown[]) => unknown).bind(target) as T[K];
  Object.defineProperty(target, method, { value: replace(original), configurable: true, writable: true });
  return () => {
    if (own) Object.defineProperty(target, method, own);
    else delete (target as Record<PropertyKey, unknown>)[method as PropertyKey];
  };
}

/** A promise the test opens when it chooses: what waits on it is stalled until then. */
export function gate(): { opened: Promise<void>; open(): void } {
  let open!: () => void;
  const opened = new Promise<void>((resolve) => (open = resolve));
  return { opened, open };
}

export const d1Down = () => new Error("D1_ERROR: Network connection lost (injected)");
