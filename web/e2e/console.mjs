// The console in a real browser (Debian's Chromium through playwright-core) against a
// running pool: tests/tests/console.rs starts `poolctl lab` and runs this with
//   CONSOLE_URL            a member's console, https://127.0.0.1:7141/
//   CONSOLE_CERT           that member's certificate (the browser accepts its key only)
//   CONSOLE_PASSWORD_FILE  the admin's password (a file: a secret stays off command lines)
//   CONSOLE_CHANGE         a program that changes the pool from outside the browser:
//                          `disk` makes a disk and prints its name, `echo` gives the VM
//                          (stopped) the test guest's echo command line
//   CONSOLE_VM             a running VM of the test guest in heartbeat mode (default demo)
//   CONSOLE_SHOTS          where a screenshot of each view goes
// Each step prints a line; any failure exits non-zero with what the page showed.
import { chromium } from "playwright-core";
import { execFileSync } from "node:child_process";
import { createHash, X509Certificate } from "node:crypto";
import { mkdirSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
};
const url = env("CONSOLE_URL");
const password = readFileSync(env("CONSOLE_PASSWORD_FILE"), "utf8").trim();
const vmName = process.env.CONSOLE_VM ?? "demo";
const spki = createHash("sha256")
  .update(new X509Certificate(readFileSync(env("CONSOLE_CERT"))).publicKey.export({ type: "spki", format: "der" }))
  .digest("base64");

const STEP_MS = 30_000;
const profile = mkdtempSync(join(tmpdir(), "console-e2e-"));
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
    // The lab's CA is not in this fresh profile's trust store: accept this key, no other.
    `--ignore-certificate-errors-spki-list=${spki}`,
  ],
});
const page = context.pages()[0] ?? (await context.newPage());
page.setDefaultTimeout(STEP_MS);
const problems = [];
page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
page.on("console", (m) => {
  // A policy violation means the page does something poold's CSP forbids.
  if (m.type() === "error" && /Content Security Policy|Refused to/.test(m.text())) problems.push(m.text());
});

const began = Date.now();
const step = (what) => console.log(`STEP ${((Date.now() - began) / 1000).toFixed(1)}s ${what}`);
const shots = process.env.CONSOLE_SHOTS;
if (shots) mkdirSync(shots, { recursive: true });
let shot = 0;
const snap = async (name) => {
  if (shots) await page.screenshot({ path: join(shots, `${String(++shot).padStart(2, "0")}-${name}.png`) });
};
const change = (what) => execFileSync(env("CONSOLE_CHANGE"), [what], { encoding: "utf8" }).trim();
/** The highest heartbeat the console shows. */
const lastBeat = async () => {
  const seqs = [...(await page.locator(".xterm-rows").innerText()).matchAll(/HB seq=(\d+)/g)].map((m) => Number(m[1]));
  return seqs.length > 0 ? Math.max(...seqs) : 0;
};
const beatsAfter = async (seq) => {
  for (const end = Date.now() + STEP_MS; Date.now() < end; await page.waitForTimeout(200)) {
    if ((await lastBeat()) > seq) return;
  }
  throw new Error(`no heartbeat after ${seq} on the console within ${STEP_MS} ms`);
};

try {
  await page.goto(url);
  await page.locator("form.login").waitFor();
  await snap("login");
  step("the login form");

  await page.fill("input[name=user]", "admin");
  await page.fill("input[name=password]", "not the password");
  await page.click("button[type=submit]");
  await page.locator("[role=alert]", { hasText: "Unauthenticated" }).waitFor();
  step("a wrong password is refused");

  await page.fill("input[name=password]", password);
  await page.click("button[type=submit]");
  await page.locator("[data-status=live]").waitFor();
  const vmLink = page.locator(".tree a[data-kind=vm]", { hasText: vmName });
  await vmLink.locator(".state", { hasText: "running" }).waitFor();
  const hosts = await page.locator(".tree a[data-kind=host]").count();
  await snap("inventory");
  step(`logged in; the inventory is live: ${hosts} hosts, ${vmName} running`);

  // The session is the tab's: a reload keeps it and the feed starts again.
  await page.reload();
  await page.locator("[data-status=live]").waitFor();
  step("a reload keeps the session");

  await page.fill("input.search", vmName.slice(0, 3).toUpperCase());
  await page.locator(".found a[data-kind=vm]", { hasText: vmName }).click();
  const panel = page.locator("[data-panel=vm]");
  await panel.locator("h2", { hasText: vmName }).waitFor();
  await page.fill("input.search", "");
  await snap("vm");
  step("search finds the VM and opens it");

  // Its console: the guest's heartbeats, live.
  await panel.getByRole("tab", { name: "Console" }).click();
  await panel.locator("[data-field=console-state]", { hasText: "connected" }).waitFor();
  await page.locator(".xterm-rows", { hasText: "HB seq=" }).waitFor();
  await beatsAfter(await lastBeat());
  await snap("console");
  step(`the console shows the guest's heartbeats (up to seq=${await lastBeat()})`);
  await panel.getByRole("tab", { name: "Overview" }).click();

  // A change made elsewhere shows up without a reload.
  const made = change("disk");
  const changed = Date.now();
  await page.locator(".tree a[data-kind=volume]", { hasText: made }).waitFor();
  const shownMs = Date.now() - changed;
  step(`a disk made by poolctl appears live: ${made}`);
  console.log(`FIGURE console_change_shown_ms ${shownMs}`);

  // Migrate to the other host, chosen in the form; the host field follows.
  const from = (await panel.locator("[data-field=host]").textContent()).trim();
  const options = await panel.locator("select[name=destination] option").allTextContents();
  const to = options.find((o) => o !== from && !o.startsWith("the host"));
  if (to === undefined) throw new Error(`no other host to migrate to: ${options}`);
  await panel.locator("select[name=destination]").selectOption({ label: to });
  const migrating = Date.now();
  await panel.getByRole("button", { name: "Migrate" }).click();
  await panel.locator("[data-field=host]", { hasText: to }).waitFor({ timeout: 60_000 });
  await panel.locator("[data-field=power]", { hasText: "running" }).waitFor();
  step(`migrated from ${from} to ${to}`);
  console.log(`FIGURE console_migration_shown_ms ${Date.now() - migrating}`);
  // The console follows the VM to its new host; the guest's count goes on.
  const before = await (async () => {
    await panel.getByRole("tab", { name: "Console" }).click();
    await panel.locator("[data-field=console-state]", { hasText: "connected" }).waitFor();
    await page.locator(".xterm-rows", { hasText: "HB seq=" }).waitFor();
    return lastBeat();
  })();
  await beatsAfter(before);
  step(`the console on ${to} shows the heartbeats going on (seq=${await lastBeat()})`);
  await panel.getByRole("tab", { name: "Overview" }).click();

  await panel.getByRole("button", { name: "Force off" }).click();
  await panel.locator("[data-field=power]", { hasText: "stopped" }).waitFor();
  step("forced off");
  change("echo");
  await panel.getByRole("button", { name: "Start" }).click();
  await panel.locator("[data-field=power]", { hasText: "running" }).waitFor({ timeout: 60_000 });
  step("started again, as the echo guest");

  // Typing, then "Send text" (what a paste into the box sends), each echoed by the guest.
  await panel.getByRole("tab", { name: "Console" }).click();
  await panel.locator("[data-field=console-state]", { hasText: "connected" }).waitFor();
  await page.locator(".xterm-rows", { hasText: "then=echo" }).waitFor();
  await page.locator(".xterm-screen").click();
  await page.keyboard.type("typed into the console");
  await page.keyboard.press("Enter");
  await page.locator(".xterm-rows", { hasText: "ECHO typed into the console" }).waitFor();
  await panel.locator("textarea[name=send-text]").fill("pasted line one\npasted line two\n");
  await panel.getByRole("button", { name: "Send text" }).click();
  await page.locator(".xterm-rows", { hasText: "ECHO pasted line two" }).waitFor();
  await page.locator(".xterm-rows", { hasText: "ECHO pasted line one" }).waitFor();
  await snap("console-echo");
  step("typed and sent text reach the guest, which echoes them");
  await panel.getByRole("tab", { name: "Overview" }).click();
  await page.locator(".tasks tr[data-task='vm.start']").first().waitFor();
  step("the tasks list shows the start");

  await page.getByRole("button", { name: "Log out" }).click();
  await page.locator("form.login").waitFor();
  await page.reload();
  await page.locator("form.login").waitFor();
  step("logged out, and a reload does not log back in");

  if (problems.length > 0) throw new Error(`the page reported:\n${problems.join("\n")}`);
  console.log("CONSOLE E2E OK");
} catch (e) {
  console.error(`CONSOLE E2E FAILED: ${e.message}`);
  for (const p of problems) console.error(p);
  try {
    console.error(`the page showed:\n${await page.locator("body").innerText()}`);
  } catch {
    // The page is gone; the error says enough.
  }
  process.exitCode = 1;
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
