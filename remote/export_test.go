package remote

// DecodeSegment is decodeSegment, for the benchmark's whole-object reads.
var DecodeSegment = decodeSegment
