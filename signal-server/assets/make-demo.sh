#!/usr/bin/env bash
# Makes demo.mp4, the clip the built-in demo source loops as a live stream.
# 16 s so that both tracks end on a frame boundary: 480 video frames at 30 fps,
# and 750 AAC frames of 1024 samples at 48 kHz. One keyframe per second, one
# fragment per keyframe, so every 1-s fragment can start playback.
set -euo pipefail
cd "$(dirname "$0")"
ffmpeg -hide_banner -y \
  -f lavfi -i "testsrc2=size=640x360:rate=30,drawtext=fontfile=/usr/share/fonts/truetype/dejavu/DejaVuSansMono-Bold.ttf:text='clubcast demo  %{pts\:hms}':x=20:y=20:fontsize=28:fontcolor=white:box=1:boxcolor=black@0.6" \
  -f lavfi -i "sine=frequency=440:beep_factor=4:sample_rate=48000" \
  -t 16 \
  -c:v libx264 -profile:v baseline -preset veryfast -pix_fmt yuv420p \
  -b:v 700k -maxrate 900k -bufsize 900k -g 30 -keyint_min 30 -sc_threshold 0 -bf 0 \
  -c:a aac -b:a 64k -ac 1 \
  -movflags frag_keyframe+empty_moov+default_base_moof -frag_duration 1000000 \
  -fflags +bitexact -flags:v +bitexact -flags:a +bitexact \
  -f mp4 demo.mp4
