// Debian's Chromium, headless, for the console's browser test and benchmark: a fresh
// profile, the flags a root CI machine needs, and the pool member's key accepted (the
// lab's CA is not in a fresh profile's trust store; only this key is, no other).
import { chromium } from "playwright-core";
import { createHash, X509Certificate } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

export function need(name) {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
}

/** The browser, and a function that closes it and removes its profile. */
export async function launch(certFile) {
  const spki = createHash("sha256")
    .update(new X509Certificate(readFileSync(certFile)).publicKey.export({ type: "spki", format: "der" }))
    .digest("base64");
  const profile = mkdtempSync(join(tmpdir(), "console-browser-"));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    headless: true,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--no-first-run",
      `--ignore-certificate-errors-spki-list=${spki}`,
    ],
  });
  const page = context.pages()[0] ?? (await context.newPage());
  const close = async () => {
    await context.close();
    rmSync(profile, { recursive: true, force: true });
  };
  return { context, page, close };
}

/** Logs in through the console's form as `user`. */
export async function logIn(page, url, user, password) {
  await page.goto(url);
  await page.fill("input[name=user]", user);
  await page.fill("input[name=password]", password);
  await page.click("button[type=submit]");
  await page.locator("[data-status=live]").waitFor();
}
