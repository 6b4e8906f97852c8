//! The host's side of the pool: registering with the coordinators and heartbeating
//! (metrics and the VMs this host runs), and obeying what the pool answers.
