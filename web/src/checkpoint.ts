// Checkpoints: VM snapshots that hold the VM's memory and device state (a state volume)
// beside its disks. The pool's rules, worded for the page so a disabled action says why;
// poold checks the same regardless (state/suspend.rs `check_checkpoint`, and a revert's
// checks in state/jobs.rs).
import { PowerState } from "./gen/host_pb";
import type { VmSnapshot } from "./gen/pool_pb";
import { power } from "./format";

export function isCheckpoint(s: VmSnapshot): boolean {
  return s.stateVolumeId !== "";
}

/** Why a checkpoint of a VM in `state` cannot be taken now; "" when it can (running or
 * paused: the pool pauses it, saves its memory, snapshots its disks, and it runs on). */
export function whyNoCheckpoint(state: PowerState): string {
  switch (state) {
    case PowerState.RUNNING:
    case PowerState.PAUSED:
      return "";
    case PowerState.SUSPENDED:
      return "the VM is suspended, its memory saved already: resume it to take a checkpoint, or take a snapshot of its disks";
    default:
      return `the VM is ${power(state)}: a checkpoint saves a running VM's memory (take a snapshot of its disks instead)`;
  }
}

/** Why a VM in `state` cannot be reverted to a snapshot now; "" when it can (stopped). */
export function whyNoRevert(state: PowerState): string {
  switch (state) {
    case PowerState.STOPPED:
    case PowerState.CRASHED:
      return "";
    case PowerState.SUSPENDED:
      return "the VM is suspended: resume it and shut it down before reverting it";
    default:
      return `the VM is ${power(state)}: shut it down before reverting it`;
  }
}
