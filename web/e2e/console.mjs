// The console in a real browser (Debian's Chromium through playwright-core) against a
// running pool: tests/tests/console.rs starts `poolctl lab` and runs this with
//   CONSOLE_URL            a member's console, https://127.0.0.1:7141/
//   CONSOLE_CERT           that member's certificate (the browser accepts its key only)
//   CONSOLE_PASSWORD_FILE  the admin's password (a file: a secret stays off command lines)
//   CONSOLE_CHANGE         a program that changes the pool from outside the browser:
//                          `disk` makes a disk and prints its name, `echo` gives the VM
//                          (stopped) the test guest's echo command line, `heartbeat`
//                          makes a host 2 s without heartbeats dead, `kill-host H`
//                          kills host H's hostd (and with it its VMs) with SIGKILL;
//                          `vm NAME` prints the VM's fields as the API has them
//                          (`poolctl vm-show --json`), to check the page against;
//                          `snapshots VM` its snapshots (`vm-snapshot-list --json`),
//                          `vifs VM` its VIFs (`vif-list --vm VM --json`)
//   CONSOLE_VM             a running VM of the test guest in heartbeat mode (default demo)
//   CONSOLE_SHOTS          where a screenshot of each view goes
//   CONSOLE_VIEWER_PASSWORD_FILE  the password of `viewer`, a read-only user
// Each step prints a line; any failure exits non-zero with what the page showed.
import { execFileSync } from "node:child_process";
import { mkdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { launch, need as env } from "./browser.mjs";

const url = env("CONSOLE_URL");
const password = readFileSync(env("CONSOLE_PASSWORD_FILE"), "utf8").trim();
const vmName = process.env.CONSOLE_VM ?? "demo";

const STEP_MS = 30_000;
const { page, close } = await launch(env("CONSOLE_CERT"));
page.setDefaultTimeout(STEP_MS);
const problems = [];
page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
// Deletions ask first; the test says yes.
page.on("dialog", (d) => void d.accept());
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
const change = (...what) => execFileSync(env("CONSOLE_CHANGE"), what, { encoding: "utf8" }).trim();
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

  // Its graphs: the pool's history of what the host reported.
  await panel.getByRole("tab", { name: "Graphs" }).click();
  await page.locator("[data-graph=rss_bytes] [data-field=latest]").waitFor();
  await snap("graphs");
  const memory = await page.locator("[data-graph=rss_bytes] [data-field=latest]").innerText();
  await page.locator("select[name=graph-range]").selectOption({ label: "2 hours" });
  await page.locator("[data-graph=rss_bytes] [data-field=latest]").waitFor();
  step(`the graphs show the VM's memory (${memory}), over 10 minutes and over 2 hours`);
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

  // A VM from the template, with the wizard; then a snapshot of it, and a revert.
  await page.locator(".tree a[data-kind=pool]").click();
  const wizard = page.locator("form[data-form=new-vm]");
  await wizard.locator("select[name=template]").selectOption({ label: "guest" });
  await wizard.locator("input[name=name]").fill("made-in-browser");
  await wizard.locator("input[name=memory]").fill("32");
  await wizard.getByRole("button", { name: "Create" }).click();
  const newVm = page.locator(".tree a[data-kind=vm]", { hasText: "made-in-browser" });
  await newVm.locator(".state", { hasText: "running" }).waitFor({ timeout: 60_000 });
  await snap("new-vm");
  step("a VM made with the wizard from the template runs");
  await newVm.click();
  const newPanel = page.locator("[data-panel=vm]", { hasText: "made-in-browser" });
  await newPanel.locator("input[name=snapshot-name]").fill("before-change");
  await newPanel.getByRole("button", { name: "Take snapshot" }).click();
  await newPanel.locator("[data-snapshot=before-change]").waitFor({ timeout: 60_000 });
  await newPanel.getByRole("button", { name: "Force off" }).click();
  await newPanel.locator("[data-field=power]", { hasText: "stopped" }).waitFor();
  await newPanel.locator("[data-snapshot=before-change]").getByRole("button", { name: "Revert" }).click();
  await page.locator(".tasks tr[data-task='vm.revert']", { hasText: "succeeded" }).waitFor({ timeout: 60_000 });
  if ((await newPanel.locator("[role=alert]").count()) > 0) {
    throw new Error(`revert: ${await newPanel.locator("[role=alert]").innerText()}`);
  }
  await snap("snapshots");
  step("a snapshot taken, listed, and reverted to");

  // Snapshots form a tree: one taken after a revert is a child of the snapshot reverted
  // to; deleting that one makes the child a root, still the VM's current one.
  await newPanel.locator("input[name=snapshot-name]").fill("after-revert");
  await newPanel.getByRole("button", { name: "Take snapshot" }).click();
  const child = newPanel.locator("[data-snapshot=after-revert]");
  await child.waitFor({ timeout: 60_000 });
  await newPanel.locator("[data-snapshot=after-revert][data-depth='1'][data-current=true]").waitFor();
  await snap("snapshot-tree");
  await newPanel.locator("[data-snapshot=before-change]").getByRole("button", { name: "Delete" }).click();
  await newPanel.locator("[data-snapshot=before-change]").waitFor({ state: "detached", timeout: 60_000 });
  await newPanel.locator("[data-snapshot=after-revert][data-depth='0'][data-current=true]").waitFor();
  step("a second snapshot is the child of the one reverted to; deleting the parent re-parents it");

  // Export: the member makes the OVA from a snapshot it takes and deletes for the
  // purpose while the page shows how far it got; then the browser downloads the package,
  // the VM's snapshot tree as it was.
  const exportProgress = newPanel.locator("[data-field=export-progress]");
  const [download] = await Promise.all([
    page.waitForEvent("download", { timeout: 120_000 }),
    (async () => {
      await newPanel.getByRole("button", { name: "Export" }).click();
      await exportProgress.waitFor();
    })(),
  ]);
  await exportProgress.filter({ hasText: "downloading" }).waitFor();
  const saved = await download.path();
  if (download.suggestedFilename() !== "made-in-browser.ova") throw new Error(`the package is named ${download.suggestedFilename()}`);
  // A tar archive whose first file is the descriptor.
  const first = readFileSync(saved).subarray(0, 100).toString("latin1");
  if (!first.startsWith("made-in-browser.ovf\0")) throw new Error(`the package starts with ${JSON.stringify(first.slice(0, 40))}`);
  await newPanel.locator("[data-snapshot^='export-']").waitFor({ state: "detached" });
  await newPanel.locator("[data-snapshot=after-revert][data-current=true]").waitFor();
  if ((await newPanel.locator("[role=alert]").count()) > 0) {
    throw new Error(`export: ${await newPanel.locator("[role=alert]").innerText()}`);
  }
  await snap("export");
  step(`exported with its progress shown and downloaded as ${download.suggestedFilename()}; its snapshot is gone again`);

  // Storage, as Openfiler's pages: a disk made in the repository, a snapshot of it, an
  // initiator allowed in (its CHAP secrets shown once), listed in the ACL, then revoked.
  const srLink = page.locator(".tree a[data-kind=sr]").first();
  const srName = await srLink.innerText();
  await srLink.click();
  const srPanel = page.locator("[data-panel=sr]");
  await srPanel.locator("input[name=volume-name]").fill("browser-disk");
  await srPanel.locator("input[name=volume-gib]").fill("1");
  await srPanel.getByRole("button", { name: "Create disk" }).click();
  await srPanel.locator("tr[data-volume=browser-disk]").waitFor({ timeout: 60_000 });
  await srPanel.locator("tr[data-volume=browser-disk] a").click();
  const volPanel = page.locator("[data-panel=volume]", { hasText: "browser-disk" });
  await volPanel.locator("[data-field=size]", { hasText: "1.0 GiB" }).waitFor();
  await volPanel.locator("input[name=volume-snapshot-name]").fill("browser-disk-snap");
  await volPanel.getByRole("button", { name: "Snapshot" }).click();
  await volPanel.locator("[data-list=derived] [data-volume=browser-disk-snap]").waitFor({ timeout: 60_000 });
  await volPanel.locator("select[name=revert-to]").selectOption({ label: "browser-disk-snap" });
  await volPanel.getByRole("button", { name: "Revert" }).click();
  await page.locator(".tasks tr[data-task='volume.revert']", { hasText: "succeeded" }).waitFor({ timeout: 60_000 });
  const iqn = "iqn.2026-12.org.example:browser";
  await volPanel.locator("input[name=initiator-iqn]").fill(iqn);
  await volPanel.getByRole("button", { name: "Allow initiator" }).click();
  await volPanel.locator("[data-field=granted]", { hasText: "CHAP" }).waitFor({ timeout: 60_000 });
  const acl = volPanel.locator(`[data-list=acl] tr[data-initiator='${iqn}']`);
  await acl.locator("td", { hasText: "outside the pool" }).waitFor();
  // The secrets are shown once, and kept out of the screenshot.
  await volPanel.locator("[data-field=granted]").getByRole("button", { name: "Hide" }).click();
  await volPanel.locator("[data-field=granted]").waitFor({ state: "detached" });
  await snap("storage");
  await acl.getByRole("button", { name: "Revoke" }).click();
  await acl.waitFor({ state: "detached" });
  if ((await volPanel.locator("[role=alert]").count()) > 0) throw new Error(`storage: ${await volPanel.locator("[role=alert]").innerText()}`);
  step(`in ${srName.trim()}: a disk made, snapshotted, reverted, exported to ${iqn} and revoked`);

  // The disk downloaded as qcow2 through the same prepare, progress and ticket.
  await volPanel.locator("select[name=download-format]").selectOption("qcow2");
  const [disk] = await Promise.all([
    page.waitForEvent("download", { timeout: 120_000 }),
    volPanel.getByRole("button", { name: "Download" }).click(),
  ]);
  if (disk.suggestedFilename() !== "browser-disk.qcow2") throw new Error(`the disk is named ${disk.suggestedFilename()}`);
  const magic = readFileSync(await disk.path()).subarray(0, 4).toString("latin1");
  if (magic !== "QFI\xfb") throw new Error(`the disk starts with ${JSON.stringify(magic)}, not qcow2's magic`);
  await volPanel.locator("[data-field=download-progress]", { hasText: "downloading" }).waitFor();
  if ((await volPanel.locator("[role=alert]").count()) > 0) throw new Error(`download: ${await volPanel.locator("[role=alert]").innerText()}`);
  step(`browser-disk downloaded as ${disk.suggestedFilename()}`);

  // That disk attached to the stopped VM made in the browser, as its next device, then
  // detached again; the VM renamed from its settings and back.
  await page.locator(".tree a[data-kind=vm]", { hasText: "made-in-browser" }).click();
  const stoppedPanel = page.locator("[data-panel=vm]", { hasText: "made-in-browser" });
  const option = stoppedPanel.locator("select[name=attach-disk] option", { hasText: /^browser-disk \(/ });
  await stoppedPanel.locator("select[name=attach-disk]").selectOption(await option.getAttribute("value"));
  await stoppedPanel.getByRole("button", { name: "Attach" }).click();
  const attached = stoppedPanel.locator("li[data-disk]", { hasText: "browser-disk" });
  await attached.waitFor();
  const device = await attached.getAttribute("data-disk");
  await snap("disk-attached");
  await attached.getByRole("button", { name: "Detach" }).click();
  await attached.waitFor({ state: "detached" });
  await stoppedPanel.locator("input[name=vm-name]").fill("made-in-browser-2");
  await stoppedPanel.getByRole("button", { name: "Save settings" }).click();
  await page.locator(".tree a[data-kind=vm]", { hasText: "made-in-browser-2" }).waitFor();
  await stoppedPanel.locator("input[name=vm-name]").fill("made-in-browser");
  await stoppedPanel.getByRole("button", { name: "Save settings" }).click();
  await page.locator(".tree a[data-kind=vm]", { hasText: "made-in-browser-2" }).waitFor({ state: "detached" });
  step(`browser-disk attached to made-in-browser as ${device}, detached; the VM renamed and back`);

  // Suspended (saved to a state volume, on no host) and resumed where the pool chooses.
  await stoppedPanel.getByRole("button", { name: "Start" }).click();
  await stoppedPanel.locator("[data-field=power]", { hasText: "running" }).waitFor({ timeout: 60_000 });
  await stoppedPanel.getByRole("button", { name: "Suspend" }).click();
  await stoppedPanel.locator("[data-field=power]", { hasText: "suspended" }).waitFor({ timeout: 90_000 });
  await stoppedPanel.locator("[data-field=host]", { hasText: "none" }).waitFor();
  if ((await stoppedPanel.getByRole("button", { name: "Start" }).count()) > 0) throw new Error("a suspended VM is offered Start");
  await snap("suspended");
  await stoppedPanel.locator("form[data-form=resume]").getByRole("button", { name: "Resume" }).click();
  await stoppedPanel.locator("[data-field=power]", { hasText: "running" }).waitFor({ timeout: 90_000 });
  if ((await stoppedPanel.locator("[role=alert]").count()) > 0) throw new Error(`suspend/resume: ${await stoppedPanel.locator("[role=alert]").innerText()}`);
  step("made-in-browser suspended, shown suspended on no host, and resumed");

  // A checkpoint of the running VM (memory and disks at one instant), marked in the tree,
  // with the pause its task reported; no revert to it while the VM runs. Forced off, then
  // reverted to the checkpoint on the host it did not run on, named in the form: running
  // there again, as the page and the API both say.
  const ranOn = (await stoppedPanel.locator("[data-field=host]").textContent()).trim();
  await stoppedPanel.locator("input[name=snapshot-name]").fill("browser-checkpoint");
  await stoppedPanel.getByRole("button", { name: "Take checkpoint" }).click();
  const checkpoint = stoppedPanel.locator("[data-snapshot=browser-checkpoint][data-memory=true]");
  await checkpoint.locator("[data-field=memory]", { hasText: "memory" }).waitFor({ timeout: 90_000 });
  const pause = stoppedPanel.locator("[data-field=checkpoint-result]", { hasText: /taken: paused \d+ ms/ });
  await pause.waitFor({ timeout: 60_000 });
  await page.locator(".tasks tr[data-task='vm.snapshot']", { hasText: /paused \d+ ms/ }).first().waitFor();
  await stoppedPanel.locator("[data-field=power]", { hasText: "running" }).waitFor();
  const revertForm = checkpoint.locator("form[data-form=revert-checkpoint]");
  if (!(await revertForm.getByRole("button", { name: "Revert" }).isDisabled())) throw new Error("a running VM is offered a revert to its checkpoint");
  if (!/shut it down/.test((await revertForm.getAttribute("title")) ?? "")) throw new Error(`the disabled revert does not say why: ${await revertForm.getAttribute("title")}`);
  await snap("checkpoint");
  const paused = (await pause.innerText()).trim().replace(/^.*taken: /, "");
  await stoppedPanel.getByRole("button", { name: "Force off" }).click();
  await stoppedPanel.locator("[data-field=power]", { hasText: "stopped" }).waitFor({ timeout: 60_000 });
  const named = (await revertForm.locator("select[name=revert-host] option").allTextContents())
    .map((o) => o.trim())
    .filter((o) => !o.startsWith("on the host the pool chooses"))
    .map((o) => o.replace(/^on /, ""));
  const there = named.find((h) => h !== ranOn);
  if (there === undefined) throw new Error(`no host but ${ranOn} to revert to: ${named}`);
  await revertForm.locator("select[name=revert-host]").selectOption({ label: `on ${there}` });
  await revertForm.getByRole("button", { name: "Revert" }).click();
  await stoppedPanel.locator("[data-field=power]", { hasText: "running" }).waitFor({ timeout: 90_000 });
  await stoppedPanel.locator("[data-field=host]", { hasText: there }).waitFor();
  if ((await stoppedPanel.locator("[role=alert]").count()) > 0) throw new Error(`checkpoint: ${await stoppedPanel.locator("[role=alert]").innerText()}`);
  const api = Object.fromEntries(JSON.parse(change("vm", "made-in-browser")).map((r) => [r.field, r.value]));
  if (api.power !== "running" || api.host !== there) throw new Error(`the API has made-in-browser ${api.power} on ${api.host}, not running on ${there}`);
  await snap("checkpoint-reverted");
  await stoppedPanel.getByRole("button", { name: "Force off" }).click();
  await stoppedPanel.locator("[data-field=power]", { hasText: "stopped" }).waitFor({ timeout: 60_000 });
  step(`made-in-browser checkpointed on ${ranOn} (${paused}), forced off, reverted to it on ${there}: running there`);

  // Guest networks, made in the networks page's form: a private one with a subnet and an
  // address range (the pool hands VIFs addresses from it only); one with a subnet that has
  // host bits set, refused in the pool's own words (the page's hint says so first, and the
  // form goes regardless); an internal one on a host picked in the form, with a VLAN tag,
  // kept for the read-only user to look at.
  await page.locator("[data-page=networks]").click();
  const networksPage = page.locator("[data-panel=networks]");
  const netForm = networksPage.locator("form[data-form=new-network]");
  const netAlert = netForm.locator("[data-field=error]");
  await netForm.locator("input[name=network-name]").fill("browser-net");
  await netForm.locator("select[name=network-kind]").selectOption({ label: "private" });
  await netForm.locator("input[name=network-subnet]").fill("10.77.0.0/24");
  await netForm.locator("input[name=network-gateway]").fill("10.77.0.1");
  await netForm.locator("input[name=network-ranges]").fill("10.77.0.10-10.77.0.29");
  await netForm.getByRole("button", { name: "Create network" }).click();
  await networksPage.locator("tr[data-network=browser-net] [data-field=subnet]", { hasText: "10.77.0.0/24" }).waitFor();
  await networksPage.locator("tr[data-network=browser-net] [data-field=ranges]", { hasText: "10.77.0.10-10.77.0.29" }).waitFor();
  if ((await netAlert.count()) > 0) throw new Error(`create network: ${await netAlert.innerText()}`);
  const netLink = page.locator(".tree a[data-kind=network]", { hasText: "browser-net" });
  await netLink.waitFor();
  await netForm.locator("input[name=network-name]").fill("browser-bad");
  await netForm.locator("input[name=network-subnet]").fill("10.78.0.5/24");
  await netForm.locator("[data-field=hints]", { hasText: "host bits" }).waitFor();
  await netForm.getByRole("button", { name: "Create network" }).click();
  await netAlert.filter({ hasText: "InvalidArgument" }).filter({ hasText: "10.78.0.5/24" }).waitFor();
  const refusedSubnet = (await netAlert.innerText()).trim();
  if ((await page.locator(".tree a[data-kind=network]", { hasText: "browser-bad" }).count()) > 0) throw new Error("a network with a bad subnet is in the tree");
  await snap("network-refused");
  await netForm.locator("input[name=network-name]").fill("browser-lan");
  await netForm.locator("input[name=network-subnet]").fill("");
  await netForm.locator("select[name=network-kind]").selectOption({ label: "internal" });
  const lanHost = (await netForm.locator("select[name=network-host] option:not([disabled])").first().textContent()).trim();
  await netForm.locator("select[name=network-host]").selectOption({ label: lanHost });
  await netForm.locator("input[name=network-vlan]").fill("42");
  await netForm.getByRole("button", { name: "Create network" }).click();
  const lanRow = networksPage.locator("tr[data-network=browser-lan]");
  await lanRow.locator("[data-field=where]", { hasText: `host ${lanHost}` }).waitFor();
  await lanRow.locator("[data-field=vlan]", { hasText: "42" }).waitFor();
  await snap("networks");
  await netLink.click();
  const netPanel = page.locator("[data-panel=network]", { hasText: "browser-net" });
  await netPanel.locator("[data-field=subnet]", { hasText: "10.77.0.0/24" }).waitFor();
  await netPanel.locator("[data-field=gateway]", { hasText: "10.77.0.1" }).waitFor();
  await netPanel.locator("[data-field=ranges]", { hasText: "10.77.0.10-10.77.0.29" }).waitFor();
  await netPanel.locator("[data-field=room]", { hasText: "0 held of 20" }).waitFor();
  const vni = (await netPanel.locator("[data-field=vni]").innerText()).trim();
  if (!/^\d+/.test(vni)) throw new Error(`the private network's VNI reads ${vni}`);
  await snap("network");
  step(`networks made in the form: browser-net (private, 10.77.0.0/24, range 10.77.0.10-10.77.0.29, VNI ${vni.split(" ")[0]}), browser-lan (internal on ${lanHost}, VLAN 42); a bad subnet refused: ${refusedSubnet}`);

  // A VIF on it for the stopped made-in-browser, with no address given: the pool hands
  // out the lowest free one of its range, as the page and the API both say. Readdressed:
  // outside the range, the page says so and the pool refuses it; inside, it is taken.
  // The network's panel lists it, and the pool refuses to destroy the network while it
  // is there. Removed, the network goes, and leaves the tree.
  await page.locator(".tree a[data-kind=vm]", { hasText: "made-in-browser" }).click();
  const vifForm = stoppedPanel.locator("form[data-form=new-vif]");
  const netOption = vifForm.locator("select[name=network] option", { hasText: /^browser-net \(/ });
  await vifForm.locator("select[name=network]").selectOption(await netOption.getAttribute("value"));
  await vifForm.getByRole("button", { name: "Add interface" }).click();
  const vifRow = stoppedPanel.locator("[data-list=vifs] tr[data-network=browser-net]");
  await vifRow.locator("[data-field=addresses]", { hasText: /^10\.77\.0\.\d+$/ }).waitFor();
  const mac = (await vifRow.locator("[data-field=mac]").innerText()).trim();
  const handed = (await vifRow.locator("[data-field=addresses]").innerText()).trim();
  if (!/^02(:[0-9a-f]{2}){5}$/.test(mac)) throw new Error(`the VIF's MAC reads ${mac}`);
  if (handed !== "10.77.0.10") throw new Error(`the pool handed out ${handed}, not 10.77.0.10 (the lowest of its range)`);
  const apiVifs = JSON.parse(change("vifs", "made-in-browser"));
  if (apiVifs.length !== 1 || apiVifs[0].mac !== mac || apiVifs[0].ipv4 !== handed || apiVifs[0].network !== "browser-net") {
    throw new Error(`the API lists made-in-browser's VIFs as ${JSON.stringify(apiVifs)}, the page ${mac} ${handed}`);
  }
  await snap("vif-added");
  await vifRow.locator("input[name=vif-addresses]").fill("10.77.0.2");
  await vifRow.locator("[data-field=vif-hints]", { hasText: "outside network" }).waitFor();
  await vifRow.getByRole("button", { name: "Set addresses" }).click();
  await stoppedPanel.locator("[data-field=vif-error]", { hasText: "the pool does not own it" }).waitFor();
  const outside = (await stoppedPanel.locator("[data-field=vif-error]").innerText()).trim();
  await vifRow.locator("input[name=vif-addresses]").fill("10.77.0.20");
  await vifRow.getByRole("button", { name: "Set addresses" }).click();
  await vifRow.locator("[data-field=addresses]", { hasText: /^10\.77\.0\.20$/ }).waitFor();
  if ((await stoppedPanel.locator("[role=alert]").count()) > 0) throw new Error(`VIF: ${await stoppedPanel.locator("[role=alert]").innerText()}`);
  step(`a VIF on browser-net added to made-in-browser: ${mac}, given ${handed} by the pool; 10.77.0.2 refused (${outside}); readdressed to 10.77.0.20`);
  await netLink.click();
  await netPanel.locator(`[data-list=vifs] tr[data-vm=made-in-browser][data-vif='${mac}'] [data-field=addresses]`, { hasText: "10.77.0.20" }).waitFor();
  // Its ranges changed in its panel: ones that leave the VIF's address outside, hinted and
  // refused in the pool's words; then cleared (an empty input): all but the gateway.
  const rangesForm = netPanel.locator("form[data-form=ranges]");
  await rangesForm.locator("input[name=network-ranges]").fill("10.77.0.10-10.77.0.19");
  await rangesForm.locator("[data-field=ranges-hints]", { hasText: "outside the new ranges" }).waitFor();
  await rangesForm.getByRole("button", { name: "Change ranges" }).click();
  await netPanel.locator("[data-field=ranges-error]", { hasText: "outside the new ranges" }).waitFor();
  const leftOutside = (await netPanel.locator("[data-field=ranges-error]").innerText()).trim();
  await snap("network-ranges-refused");
  await rangesForm.locator("input[name=network-ranges]").fill("");
  await rangesForm.getByRole("button", { name: "Change ranges" }).click();
  await netPanel.locator("[data-field=ranges]", { hasText: "all host addresses but the gateway" }).waitFor();
  if ((await netPanel.locator("[data-field=ranges-error]").count()) > 0) throw new Error(`clear the ranges: ${await netPanel.locator("[data-field=ranges-error]").innerText()}`);
  step(`browser-net's ranges: 10.77.0.10-10.77.0.19 refused (${leftOutside}); cleared`);
  await netPanel.getByRole("button", { name: "Destroy" }).click();
  await netPanel.locator("[data-field=error]", { hasText: "in use by VIF" }).waitFor();
  const inUse = (await netPanel.locator("[data-field=error]").innerText()).trim();
  await snap("network-in-use");
  await page.locator(".tree a[data-kind=vm]", { hasText: "made-in-browser" }).click();
  await vifRow.getByRole("button", { name: "Remove" }).click();
  await vifRow.waitFor({ state: "detached" });
  await netLink.click();
  await netPanel.locator("[data-list=vifs] td", { hasText: "No VM is on this network" }).waitFor();
  await netPanel.getByRole("button", { name: "Destroy" }).click();
  await netLink.waitFor({ state: "detached" });
  step(`browser-net refused while in use (${inUse}); the VIF removed, destroyed and gone from the tree`);

  // A schedule of the running demo VM made in its page, keeping the last snapshot only:
  // first a time outside its period, refused in the page before any call; then run now
  // twice, the retention deletes the older run's snapshot, and the VM's tree shows one
  // snapshot with the schedule's badge. Deleted, its snapshot stays, badge gone.
  await page.locator("[data-page=schedules]").click();
  const schedules = page.locator("[data-panel=schedules]");
  const form = schedules.locator("form[data-form=schedule]");
  await form.locator("input[name=schedule-name]").fill("browser-sched");
  await form.locator("select[name=schedule-vm]").selectOption({ label: vmName });
  await form.locator("input[name=schedule-every]").fill("1");
  await form.locator("select[name=schedule-unit]").selectOption("h");
  await form.locator("input[name=schedule-at]").fill("02:00");
  await form.locator("input[name=keep-last]").fill("1");
  await form.getByRole("button", { name: "Save schedule" }).click();
  await form.locator("[data-field=form-error]", { hasText: "02:00 is not within the period of 1h" }).waitFor();
  await form.locator("select[name=schedule-unit]").selectOption("d");
  await form.getByRole("button", { name: "Save schedule" }).click();
  const sched = schedules.locator("tr[data-schedule=browser-sched]");
  await sched.locator("[data-field=retention]", { hasText: "last 1, daily 0, weekly 0" }).waitFor();
  if ((await sched.locator("[data-field=vm]").innerText()).trim() !== vmName) throw new Error(`the schedule's VM reads ${await sched.locator("[data-field=vm]").innerText()}`);
  await sched.locator("[data-field=at]", { hasText: "02:00" }).waitFor();
  const schedCount = sched.locator("[data-field=snapshots]");
  const lastTask = sched.locator("[data-field=last-task]");
  await sched.getByRole("button", { name: "Run now" }).click();
  await lastTask.filter({ hasText: "succeeded" }).waitFor({ timeout: 60_000 });
  await schedCount.filter({ hasText: /^1$/ }).waitFor();
  const firstRun = await lastTask.getAttribute("data-task-id");
  await sched.getByRole("button", { name: "Run now" }).click();
  await page.waitForFunction(
    (first) => {
      const t = document.querySelector("tr[data-schedule=browser-sched] [data-field=last-task]");
      return t !== null && t.getAttribute("data-task-id") !== first && t.textContent?.trim() === "succeeded";
    },
    firstRun,
    { timeout: 60_000 },
  );
  // The retention's delete, requested by the schedule.
  await page.locator(".tasks tr[data-task='vm.snapshot.delete']", { hasText: "schedule browser-sched" }).filter({ hasText: "succeeded" }).first().waitFor({ timeout: 60_000 });
  await schedCount.filter({ hasText: /^1$/ }).waitFor();
  if ((await schedules.locator("[role=alert]").count()) > 0) throw new Error(`schedule: ${await schedules.locator("[role=alert]").innerText()}`);
  await snap("schedules");
  await page.locator(".tree a[data-kind=vm]", { hasText: vmName }).click();
  await panel.locator("h2", { hasText: vmName }).waitFor();
  const badged = panel.locator("[data-list=snapshots] li[data-by-schedule=browser-sched]");
  await badged.first().waitFor();
  const taken = await badged.count();
  if (taken !== 1) throw new Error(`${taken} snapshots of browser-sched in ${vmName}'s tree, not 1: ${await panel.locator("[data-list=snapshots]").innerText()}`);
  const kept = await badged.getAttribute("data-snapshot");
  if (!kept.startsWith("browser-sched-")) throw new Error(`the schedule's snapshot is named ${kept}`);
  if ((await badged.locator("[data-field=schedule][data-schedule-name=browser-sched]").innerText()).trim() !== "browser-sched") {
    throw new Error("the schedule's snapshot has no badge naming it");
  }
  await snap("schedule-badge");
  await page.locator("[data-page=schedules]").click();
  await sched.getByRole("button", { name: "Delete" }).click();
  await sched.waitFor({ state: "detached", timeout: 60_000 });
  await page.locator(".tree a[data-kind=vm]", { hasText: vmName }).click();
  const left = panel.locator(`[data-list=snapshots] li[data-snapshot='${kept}']`);
  await left.waitFor();
  await panel.locator("[data-list=snapshots] [data-field=schedule]").first().waitFor({ state: "detached" });
  if ((await left.count()) !== 1) throw new Error(`${await left.count()} snapshots named ${kept} after the schedule's delete`);
  const rows = JSON.parse(change("snapshots", vmName)).filter((r) => r.name === kept);
  if (rows.length !== 1 || rows[0].schedule !== "") throw new Error(`the API lists ${kept} as ${JSON.stringify(rows)}, not one snapshot of no schedule`);
  step(`a schedule of ${vmName} keeping 1, run twice from its page: one snapshot (${kept}), badged; deleted, the snapshot stays unbadged`);

  // Users and roles: a user made, given a role and relieved of it; the audit log has it.
  await page.locator("[data-page=users]").click();
  const users = page.locator("[data-panel=users]");
  const newUser = users.locator("form[data-form=new-user]");
  await newUser.locator("input[name=user-name]").fill("operator-1");
  await newUser.locator("input[name=user-password]").fill("operator-password-1");
  await newUser.locator("input[name='role-vm operator']").check();
  await newUser.locator("input[name='role-read only']").uncheck();
  await newUser.getByRole("button", { name: "Create user" }).click();
  const row = users.locator("tr[data-user=operator-1]");
  await row.locator("[data-role='vm operator']").waitFor({ timeout: 60_000 });
  await row.locator("select[name=grant-role]").selectOption({ label: "read only" });
  await row.getByRole("button", { name: "Grant" }).click();
  await row.locator("[data-role='read only']").waitFor({ timeout: 60_000 });
  await row.locator("[data-role='vm operator']").getByRole("button").click();
  await row.locator("[data-role='vm operator']").waitFor({ state: "detached", timeout: 60_000 });
  await snap("users");
  step("a user made, granted a role and relieved of another, live");
  await page.locator("[data-page=audit]").click();
  const audit = page.locator("[data-panel=audit]");
  await audit.locator("input[name=audit-find]").fill("RevokeRole");
  await audit.locator("tr[data-method*=RevokeRole]").first().waitFor();
  await audit.locator("input[name=audit-find]").fill("");
  await audit.locator("tr[data-method*=CreateUser]").first().waitFor();
  await snap("audit");
  step(`the audit log lists those calls (${await audit.locator("[data-field=count]").innerText()})`);

  // Evacuating the demo's host moves it, with the host's progress shown; then back.
  await page.fill("input.search", vmName);
  await page.locator(".found a[data-kind=vm]", { hasText: vmName }).click();
  await page.fill("input.search", "");
  const where = (await panel.locator("[data-field=host]").textContent()).trim();
  await page.locator(".tree a[data-kind=host]", { hasText: where }).click();
  const hostPanel = page.locator("[data-panel=host]");
  await hostPanel.getByRole("button", { name: "Evacuate" }).click();
  await hostPanel.locator("h2 .state", { hasText: "maintenance" }).waitFor({ timeout: 90_000 });
  const moved = page.locator(".tree a[data-kind=vm]", { hasText: vmName });
  await moved.locator(".state", { hasText: "running" }).waitFor();
  await snap("evacuated");
  await hostPanel.getByRole("tab", { name: "Graphs" }).click();
  await hostPanel.locator("[data-graph=vms_running] [data-field=latest]").waitFor();
  await snap("host-graphs");
  await hostPanel.getByRole("button", { name: "Enable" }).click();
  await hostPanel.locator("h2 .state", { hasText: "enabled" }).waitFor();
  step(`host ${where} evacuated (maintenance), then enabled again`);

  // A host dies with the VM on it: the pool fences it and HA starts the VM elsewhere,
  // and the page shows it happen, no reload.
  await moved.click();
  await panel.locator("h2", { hasText: vmName }).waitFor();
  const doomed = (await panel.locator("[data-field=host]").textContent()).trim();
  change("heartbeat");
  // HA turned on from the pool's page.
  await page.locator(".tree a[data-kind=pool]").click();
  const ha = page.locator("form[data-form=ha]");
  await ha.locator("input[name=ha-enabled]").check();
  await ha.locator("input[name=ha-failures]").fill("1");
  await ha.locator("input[name=ha-timeout]").fill("2");
  await ha.getByRole("button", { name: "Save" }).click();
  await page.locator("[data-panel=ha] [data-field=ha]", { hasText: "On" }).waitFor();
  await snap("ha-settings");
  step("HA turned on from the pool's page");
  await page.locator(".tree a[data-kind=vm]", { hasText: vmName }).click();
  await panel.locator("h2", { hasText: vmName }).waitFor();
  const killed = Date.now();
  change("kill-host", doomed);
  await page.locator(".tree a[data-kind=host]", { hasText: doomed }).locator(".state", { hasText: /unreachable|fenced/ }).waitFor({ timeout: 60_000 });
  await page.waitForFunction(
    (doomed) => {
      const p = document.querySelector("[data-panel=vm]");
      const host = p?.querySelector("[data-field=host]")?.textContent?.trim();
      const power = p?.querySelector("[data-field=power]")?.textContent?.trim();
      return host !== undefined && host !== doomed && host !== "none" && power === "running";
    },
    doomed,
    { timeout: 90_000 },
  );
  const rescuer = (await panel.locator("[data-field=host]").textContent()).trim();
  await snap("ha-restart");
  step(`host ${doomed} killed: ${vmName} restarted by HA on ${rescuer}`);
  console.log(`FIGURE console_ha_restart_shown_ms ${Date.now() - killed}`);

  // The alerts that raised, live: the dead host and the restart; the restart dismissed.
  await page.locator("[data-page=alerts]").click();
  const alerts = page.locator("[data-panel=alerts]");
  await alerts.locator("tr[data-alert='host unreachable']", { hasText: doomed }).first().waitFor({ timeout: 30_000 });
  const restart = alerts.locator("tr[data-alert='ha restart']", { hasText: vmName }).first();
  await restart.waitFor({ timeout: 30_000 });
  const open = Number(await page.locator("[data-field=open-alerts]").innerText());
  await snap("alerts");
  await restart.getByRole("button", { name: "Dismiss" }).click();
  await page.waitForFunction((n) => Number(document.querySelector("[data-field=open-alerts]")?.textContent) === n - 1, open, { timeout: 30_000 });
  step(`alerts: ${doomed} unreachable, ${vmName} restarted by HA (${open} open; the restart dismissed)`);

  await page.getByRole("button", { name: "Log out" }).click();
  await page.locator("form.login").waitFor();
  await page.reload();
  await page.locator("form.login").waitFor();
  step("logged out, and a reload does not log back in");

  // A read-only user sees the pool and no action at all.
  const viewer = readFileSync(env("CONSOLE_VIEWER_PASSWORD_FILE"), "utf8").trim();
  await page.fill("input[name=user]", "viewer");
  await page.fill("input[name=password]", viewer);
  await page.click("button[type=submit]");
  await page.locator("[data-status=live]").waitFor();
  await page.locator(".tree a[data-kind=vm]", { hasText: vmName }).click();
  await panel.locator("h2", { hasText: vmName }).waitFor();
  // Permissions arrive with ListRoles; give them the time they take.
  await page.waitForTimeout(500);
  const actions = (await page.locator("main button:not([role=tab])").allTextContents()).map((t) => t.trim());
  if (actions.length > 0) throw new Error(`a read-only user is offered ${actions}`);
  await page.locator(".tree a[data-kind=pool]").click();
  if ((await page.locator("form[data-form=new-vm]").count()) > 0) throw new Error("a read-only user is offered a new VM");
  await page.locator("[data-page=schedules]").click();
  await page.locator("[data-panel=schedules] [data-list=schedules]").waitFor();
  const scheduleActions = (await page.locator("main button:not([role=tab])").allTextContents()).map((t) => t.trim());
  if (scheduleActions.length > 0) throw new Error(`a read-only user is offered ${scheduleActions} on the schedules page`);
  if ((await page.locator("form[data-form=schedule]").count()) > 0) throw new Error("a read-only user is offered the schedule form");
  // Nor on the networks: the list and a network's panel, no form, no destroy; a stopped
  // VM's interfaces are listed, with no change offered.
  await page.locator("[data-page=networks]").click();
  await page.locator("[data-panel=networks] tr[data-network=browser-lan]").waitFor();
  if ((await page.locator("form[data-form=new-network]").count()) > 0) throw new Error("a read-only user is offered the network form");
  const networkActions = (await page.locator("main button:not([role=tab])").allTextContents()).map((t) => t.trim());
  if (networkActions.length > 0) throw new Error(`a read-only user is offered ${networkActions} on the networks page`);
  await page.locator(".tree a[data-kind=network]", { hasText: "browser-lan" }).click();
  await page.locator("[data-panel=network] [data-field=host]").waitFor();
  const netActions = (await page.locator("main button:not([role=tab])").allTextContents()).map((t) => t.trim());
  if (netActions.length > 0) throw new Error(`a read-only user is offered ${netActions} on a network`);
  await page.locator(".tree a[data-kind=vm]", { hasText: "made-in-browser" }).click();
  await page.locator("[data-panel=vm] [data-field=power]", { hasText: "stopped" }).waitFor();
  await page.locator("[data-panel=vm] [data-list=vifs]").waitFor();
  const vifActions = (await page.locator("main button:not([role=tab])").allTextContents()).map((t) => t.trim());
  if (vifActions.length > 0) throw new Error(`a read-only user is offered ${vifActions} on a stopped VM`);
  if ((await page.locator("form[data-form=new-vif]").count()) > 0) throw new Error("a read-only user is offered a new VIF");
  await snap("read-only");
  step("a read-only user is offered no action (a VM, the pool, schedules, networks, a stopped VM's interfaces)");
  await page.getByRole("button", { name: "Log out" }).click();

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
  await close();
}
