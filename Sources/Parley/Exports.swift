@_exported import struct ParleyWire.ParleyAddress
@_exported import struct ParleyWire.ParleyError
@_exported import struct ParleyWire.ParleyFeatures
@_exported import protocol ParleyNIO.ParleyTransport
@_exported import struct ParleyNIO.PosixTransport
