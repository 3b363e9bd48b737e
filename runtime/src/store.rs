//! The variant store on the device.
